"""rpm-gateway: reads Bluetooth LE medical devices and delivers every reading over MQTT."""

__version__ = "0.1.0"
