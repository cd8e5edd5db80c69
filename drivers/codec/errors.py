"""The one error every codec raises for bytes it cannot decode."""


class DecodeError(ValueError):
    """Bytes that are not a valid value of the characteristic; the message says what is wrong."""
