"""ftps-gateway: a secure explicit-FTPS server for partner file exchange."""

__version__ = "0.1.0"
