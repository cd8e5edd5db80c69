"""Device drivers: one module per device profile, pure codecs under drivers.codec."""
