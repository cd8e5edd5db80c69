"""Virtual radio: bleak backends on google's bumble stack, for tests and the demo.

Imported only when the config says ``radio.kind = "virtual"``; production code on the hub must
never import this package (it pulls in bumble). Pieces: ``radio.VirtualRadio`` (the in-process
link and the hub's central), ``backend.VirtualScannerBackend`` / ``backend.VirtualClientBackend``
(pass as bleak's ``backend=`` with ``radio=``), and the simulated devices in drivers.simulated.

Split across two processes (``rpm-gateway simulate``, simulate_cli): ``field.DeviceField`` holds
the link and the devices and serves the hub's controller over HCI/TCP (``hci_server``), the
agent's ``VirtualRadio(hci="tcp:HOST:PORT")`` drives it, and ``ledger.Ledger`` writes what the
devices produced and what the hub confirmed.
"""
