"""The embedded SQLite store (the default backend)."""

from mailrelay.store.common import QueueEntry
from mailrelay.store.sqlite.store import SQLiteStore, workerFile

__all__ = ["QueueEntry", "SQLiteStore", "workerFile"]
