"""The Redis store (through txredisapi): one store shared by several relay instances."""

from mailrelay.store.redis.store import RedisStore
from mailrelay.store.sqlite.store import QueueEntry

__all__ = ["QueueEntry", "RedisStore"]
