"""What bluetoothd does that a client can see, each policy named, and the faults it can inject.

Every behaviour copied from BlueZ lives here under a name, so it can be checked against a
``dbus-monitor`` trace from a real hub and switched off to test the other path.

Not yet checked against a trace (from BlueZ's sources and bleak's handling only): the error
text when re-encryption with a stored key fails ("Authentication Failed" here; a real hub may
answer with an errno text or an le-connection-abort), the text of a Connect cancelled by
Disconnect ("Operation canceled"), and Pair's reply coming before services are resolved
(bluetoothd answers Pair once the browse completes).
"""

from __future__ import annotations

from dataclasses import dataclass

BLUEZ = "org.bluez"
ADAPTER = "org.bluez.Adapter1"
DEVICE = "org.bluez.Device1"
AGENT_MANAGER = "org.bluez.AgentManager1"
AGENT = "org.bluez.Agent1"
GATT_SERVICE = "org.bluez.GattService1"
GATT_CHARACTERISTIC = "org.bluez.GattCharacteristic1"
GATT_DESCRIPTOR = "org.bluez.GattDescriptor1"

# The error names bleak and the gateway tell apart (BlueZ src/error.c).
ERR_IN_PROGRESS = "org.bluez.Error.InProgress"
ERR_NOT_READY = "org.bluez.Error.NotReady"
ERR_FAILED = "org.bluez.Error.Failed"
ERR_NOT_PERMITTED = "org.bluez.Error.NotPermitted"
ERR_NOT_SUPPORTED = "org.bluez.Error.NotSupported"
ERR_NOT_AUTHORIZED = "org.bluez.Error.NotAuthorized"
ERR_INVALID_ARGUMENTS = "org.bluez.Error.InvalidArguments"
ERR_DOES_NOT_EXIST = "org.bluez.Error.DoesNotExist"
ERR_ALREADY_EXISTS = "org.bluez.Error.AlreadyExists"
ERR_NOT_CONNECTED = "org.bluez.Error.NotConnected"
ERR_AUTH_FAILED = "org.bluez.Error.AuthenticationFailed"
ERR_AUTH_REJECTED = "org.bluez.Error.AuthenticationRejected"
ERR_AUTH_CANCELED = "org.bluez.Error.AuthenticationCanceled"
ERR_AUTH_TIMEOUT = "org.bluez.Error.AuthenticationTimeout"
ERR_REJECTED = "org.bluez.Error.Rejected"

# ATT error codes BlueZ turns into named D-Bus errors (src/gatt-client.c, create_gatt_dbus_error).
ATT_READ_NOT_PERMITTED = 0x02
ATT_WRITE_NOT_PERMITTED = 0x03
ATT_INSUFFICIENT_AUTHENTICATION = 0x05
ATT_INVALID_OFFSET = 0x07
ATT_INSUFFICIENT_AUTHORIZATION = 0x08
ATT_INSUFFICIENT_KEY_SIZE = 0x0C
ATT_INVALID_LENGTH = 0x0D
ATT_INSUFFICIENT_ENCRYPTION = 0x0F
SECURITY_ERRORS = frozenset(
    {ATT_INSUFFICIENT_AUTHENTICATION, ATT_INSUFFICIENT_ENCRYPTION, ATT_INSUFFICIENT_KEY_SIZE}
)

REQUESTED_MTU = 517
"""BlueZ asks for the largest ATT MTU (src/shared/gatt-client.c, BT_ATT_MAX_LE_MTU)."""


@dataclass
class BluezPolicy:
    """bluetoothd's visible policies; the defaults are what BlueZ 5.66+ does."""

    # shared/att.c change_security(): an ATT request refused for missing encryption on an
    # unbonded link raises the security level (Just Works pairs implicitly) and is retried;
    # "Not paired" only reaches the client when that fails. Off: the refusal is returned.
    auto_elevate_security: bool = True
    # The GAP service (0x1800) is handled by bluetoothd itself and never exported.
    export_gap: bool = False
    # Locally initiated Just Works pairing is accepted by the kernel without asking the agent;
    # True makes the stand-in ask RequestAuthorization first (as for a peer-initiated pairing).
    ask_agent_for_just_works: bool = False
    # agent.c REQUEST_TIMEOUT: an agent that does not answer fails the pairing after this.
    agent_timeout_s: float = 60.0
    # main.conf TemporaryTimeout: a device only seen while scanning is removed this long after
    # it was last seen (discovery stopped or it went quiet), unless it is paired or connected.
    temporary_timeout_s: float = 30.0
    # shared/att.c ATT_TIMEOUT: a request with no answer for this long kills the link.
    att_timeout_s: float = 30.0
    # Kernel LE connection attempt timeout (hci_conn le_conn_timeout, default 4 s in recent
    # kernels; BlueZ retries on its own until the client's Connect gives up). Kept long.
    connect_timeout_s: float = 20.0


@dataclass
class BluezFaults:
    """Faults the stand-in injects on request; counters count down as they fire."""

    in_progress_on_connect: int = 0  # Device1.Connect answers InProgress
    in_progress_on_discovery: int = 0  # Adapter1.StartDiscovery answers InProgress
    abort_by_local_on_connect: int = 0  # connect, then drop: Failed "le-connection-abort-by-local"
    drop_before_connect: int = 0  # the device object vanishes from the cache before Connect
    # Connect answers InProgress while the adapter is discovering (controllers that cannot
    # scan and initiate at once; HA's habluetooth pauses scanning for them).
    busy_while_discovering: bool = False
