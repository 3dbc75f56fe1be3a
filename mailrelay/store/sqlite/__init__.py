"""The embedded SQLite store (the default backend)."""

from mailrelay.store.sqlite.files import workerFile
from mailrelay.store.sqlite.store import SQLiteStore

__all__ = ["SQLiteStore", "workerFile"]
