"""The Redis store (through txredisapi): one store shared by several relay instances."""

from mailrelay.store.common import QueueEntry
from mailrelay.store.redis.store import RedisStore

__all__ = ["QueueEntry", "RedisStore"]
