"""pytier: a mesh VPN node that speaks EasyTier 2.6's wire protocol."""

__version__ = "0.1.0"
