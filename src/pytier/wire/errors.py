"""The one error type every wire decoder raises."""


class WireError(ValueError):
    """Malformed bytes on the wire: a codec refused its input."""
