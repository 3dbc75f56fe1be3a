"""The embedded SQLite store (the default backend)."""

from mailrelay.store.sqlite.store import QueueEntry, SQLiteStore

__all__ = ["QueueEntry", "SQLiteStore"]
