"""The embedded SQLite store (the default backend)."""

from mailrelay.store.sqlite.store import SQLiteStore, workerFile

__all__ = ["SQLiteStore", "workerFile"]
