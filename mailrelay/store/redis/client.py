"""
The one place that talks to txredisapi (which has no type hints: ``Any`` stays in here).

Connections decode nothing (``charset=None``, ``convertNumbers=False``): bulk replies are
bytes, integers ints, status replies str, and the store decides what is text. txredisapi's
own transaction helpers (``multi``/``watch``) are not used: they keep a connection out of the
pool for good when the server answers WATCH or EXEC with an error. :meth:`RedisClient.reserve`
lends a connection instead, and :meth:`RedisClient.giveBack` returns it -- or closes it, when
it may still be inside a transaction, and the pool connects a fresh one.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred

from mailrelay.store.redis.url import RedisURL

ResponseError = txredisapi.ResponseError
"""What a command fails with when the server answers it with an error reply."""


class RedisClient:
    """
    A pool of ``poolSize`` connections to ``url``'s server that reconnect on their own.

    ``timeout`` bounds connecting and each reply (a connection whose reply is late is closed
    and replaced). txredisapi schedules its timers on the global reactor.
    """

    def __init__(self, url: RedisURL, timeout: float, poolSize: int) -> None:
        self.url = url
        self._timeout = timeout
        self._poolSize = poolSize
        self._handler: Any = None

    def _options(self) -> dict[str, Any]:
        url = self.url
        return {
            "host": url.host,
            "port": url.port,
            "dbid": url.db or None,
            "charset": None,
            "convertNumbers": False,
            "password": url.password,
            "username": url.username,
            "connectTimeout": self._timeout,
            "replyTimeout": self._timeout,
        }

    async def probe(self) -> Any:
        """
        One connection that does not reconnect: connecting fails at once (with RedisError or
        ValueError) when the server refuses, or the password or database number is wrong.
        Close it with its ``disconnect()``.
        """
        return await txredisapi.Connection(reconnect=False, **self._options())

    def start(self) -> None:
        """Start the pool; commands wait for its first connection."""
        self._handler = txredisapi.lazyConnectionPool(
            poolsize=self._poolSize, reconnect=True, **self._options()
        )

    async def stop(self) -> None:
        """Close every connection of the pool."""
        handler, self._handler = self._handler, None
        if handler is not None:
            await handler.disconnect()

    def command(self, *args: str | bytes | int) -> Deferred[Any]:
        """Send one command on one of the pool's connections. Returns Deferred[reply]."""
        return self._handler.execute_command(*args)

    def eval(self, source: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """Run a Lua script (EVALSHA, falling back to EVAL). Returns Deferred[reply]."""
        return self._handler.eval(source, keys, args)

    def reserve(self) -> Deferred[Any]:
        """
        Lend a connection nothing else uses until :meth:`giveBack`; commands on it are
        ``connection.execute_command(*args)`` and are sent at once (pipelined).
        """
        return self._handler._factory.getConnection(peek=False)

    def giveBack(self, connection: Any, clean: bool) -> None:
        """
        End a loan. ``clean``: the connection is outside any WATCH or MULTI and every reply
        asked for has come (or will come in order); otherwise it is closed.
        """
        if not connection.connected:
            return
        if clean and self._handler is not None:
            self._handler._factory.connectionQueue.put(connection)
        else:
            connection.transport.abortConnection()
