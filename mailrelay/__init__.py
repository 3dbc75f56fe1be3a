"""mailrelay: the SMTP front door of a messaging platform."""

__version__ = "0.2.0"
"""The one place the version is written: setup.cfg reads it (``version = attr:``)."""
