"""Pure encode/decode of Bluetooth health characteristics (no I/O)."""
