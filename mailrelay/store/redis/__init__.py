"""The Redis store (through txredisapi): one store shared by several relay instances."""

from mailrelay.store.redis.store import RedisStore

__all__ = ["RedisStore"]
