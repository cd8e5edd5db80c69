"""A stand-in for bluetoothd: org.bluez on a private D-Bus, backed by the virtual radio.

Test- and demo-only (the ``sim`` extra): bleak's real BlueZ backend and the gateway's own
pairing agent talk D-Bus to it exactly as they would to bluetoothd on the hub, while ATT, GATT,
MTU exchange, SMP pairing and re-encryption run for real on bumble underneath.
"""
