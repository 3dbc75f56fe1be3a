"""
The one place that talks to txredisapi (which has no type hints: ``Any`` stays in here).

Connections decode nothing (``charset=None``, ``convertNumbers=False``): bulk replies are
bytes, integers ints, status replies str, and the store decides what is text. txredisapi's
own transaction helpers (``multi``/``watch``) are not used: they keep a connection out of the
pool for good when the server answers WATCH or EXEC with an error. :meth:`RedisClient.reserve`
lends a connection instead, and :meth:`RedisClient.giveBack` returns it -- or closes it, when
it may still be inside a transaction, and the pool connects a fresh one.

With a ``redis-sentinel://`` URL, every connection of the pool is made to the primary the
sentinels name at that moment: :class:`SentinelEndpoint` asks them in turn (``SENTINEL
GET-MASTER-ADDR-BY-NAME``) before each attempt, and a server that says (``ROLE``) it is no
primary is disconnected and tried again shortly. A failover therefore reaches the relay as
closed connections -- Sentinel closes the clients of both servers when it reconfigures them,
a primary that stopped closes them too, and one whose host died times out -- after which the
pool connects to the new primary.
When the address the sentinels give changes, the pool's other connections are closed; a write
refused with ``READONLY`` (a former primary whose clients were not closed) closes them all.
(txredisapi's own ``Sentinel`` is not used: its discovery timers run on after a cancelled
attempt, and its check of ``ROLE`` refuses every server when replies are not decoded.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from mailrelay.store.redis.url import RedisURL

ResponseError = txredisapi.ResponseError
"""What a command fails with when the server answers it with an error reply."""

PRIMARY_RETRY_FIRST = 0.1
PRIMARY_RETRY_MAX = 2.0
"""Seconds between attempts to connect to the sentinels' primary: first, and at most."""


class NoPrimary(Exception):
    """No sentinel named a primary that could be reached."""


def isPrimary(role: Any) -> bool:
    """Whether a ``ROLE`` reply (text or bytes) is a primary's."""
    return bool(role) and role[0] in ("master", b"master")


class _PrimaryProtocol(txredisapi.RedisProtocol):
    """A connection that is handed to the pool only once its server says it is a primary."""

    def connectionMade(self) -> Any:
        def checkRole(role: Any) -> Any:
            if not isPrimary(role):
                self.transport.loseConnection()
                return None
            return txredisapi.RedisProtocol.connectionMade(self)

        def failed(_: Any) -> None:
            self.transport.loseConnection()

        if self.password is not None:
            self.auth(self.password, self.username)  # ROLE needs it; its reply checked below
        return self.role().addCallbacks(checkRole, failed)


class _PrimaryFactory(txredisapi.RedisFactory):
    protocol = _PrimaryProtocol
    initialDelay = PRIMARY_RETRY_FIRST
    maxDelay = PRIMARY_RETRY_MAX


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to the primary of ``url.service`` as the sentinels of ``url`` name it at the time
    of each attempt. ``moved()`` is called when the address differs from the previous one.
    """

    def __init__(
        self, reactor: Any, url: RedisURL, timeout: float, moved: Callable[[], None]
    ) -> None:
        self._reactor = reactor
        self._url = url
        self._timeout = timeout
        self._moved = moved
        self._sentinels = list(url.sentinels)
        self._last: tuple[str, int] | None = None

    async def primaryAddress(self) -> tuple[str, int]:
        """The primary's (host, port) as the first sentinel that knows it says; the sentinel
        that answered is asked first next time. Raises NoPrimary."""
        problems = []
        for sentinel in list(self._sentinels):
            host, port = sentinel
            try:
                connection = await txredisapi.Connection(
                    host,
                    port,
                    reconnect=False,
                    connectTimeout=self._timeout,
                    replyTimeout=self._timeout,
                )
                try:
                    answer = await connection.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._url.service
                    )
                finally:
                    await connection.disconnect()
            except Exception as e:
                problems.append(f"{host}:{port}: {e or type(e).__name__}")
                continue
            if not answer:
                problems.append(f"{host}:{port}: no primary named {self._url.service!r}")
                continue
            self._sentinels.remove(sentinel)
            self._sentinels.insert(0, sentinel)
            return str(answer[0]), int(answer[1])
        raise NoPrimary(f"no sentinel names the primary ({'; '.join(problems)})")

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: Any) -> Any:
        address = await self.primaryAddress()
        if self._last is not None and address != self._last:
            self._moved()
        self._last = address
        host, port = address
        endpoint = HostnameEndpoint(self._reactor, host, port, timeout=self._timeout)
        return await endpoint.connect(protocolFactory)


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
        # txredisapi connects and times out on the global reactor: so does the sentinels' side.
        self._reactor: Any = globalReactor

    def _serverOptions(self) -> dict[str, Any]:
        url = self.url
        return {
            "dbid": url.db or None,
            "charset": None,
            "convertNumbers": False,
            "password": url.password,
            "username": url.username,
            "replyTimeout": self._timeout,
        }

    def _options(self) -> dict[str, Any]:
        url = self.url
        return {
            "host": url.host,
            "port": url.port,
            "connectTimeout": self._timeout,
            **self._serverOptions(),
        }

    async def probe(self) -> Any:
        """
        One connection that does not reconnect: connecting fails at once (with RedisError or
        ValueError) when the server refuses, or the password or database number is wrong;
        with sentinels, also when none of them names a primary (NoPrimary) or the server
        named is not one (ResponseError). Close it with its ``disconnect()``.
        """
        if not self.url.sentinels:
            return await txredisapi.Connection(reconnect=False, **self._options())
        host, port = await SentinelEndpoint(
            self._reactor, self.url, self._timeout, lambda: None
        ).primaryAddress()
        connection = await txredisapi.Connection(
            reconnect=False, **{**self._options(), "host": host, "port": port}
        )
        role = await connection.execute_command("ROLE")
        if not isPrimary(role):
            await connection.disconnect()
            raise ResponseError(f"{host}:{port}, the sentinels' primary, is a replica")
        return connection

    def start(self) -> None:
        """Start the pool; commands wait for its first connection."""
        if not self.url.sentinels:
            self._handler = txredisapi.lazyConnectionPool(
                poolsize=self._poolSize, reconnect=True, **self._options()
            )
            return
        options = self._serverOptions()
        factory = _PrimaryFactory(None, options.pop("dbid"), self._poolSize, isLazy=True, **options)
        factory.startConnecting(
            SentinelEndpoint(self._reactor, self.url, self._timeout, self._closeAll)
        )
        self._handler = factory.handler

    async def stop(self) -> None:
        """Close every connection of the pool."""
        handler, self._handler = self._handler, None
        if handler is not None:
            await handler.disconnect()

    def _closeAll(self) -> None:
        if self._handler is not None:
            for connection in list(self._handler._factory.pool):
                connection.transport.loseConnection()

    def noticeFailure(self, error: BaseException) -> None:
        """
        Learn from a command's failure: with sentinels, ``READONLY`` means the server is no
        longer the primary, so every connection of the pool is closed to connect anew.
        """
        if (
            self.url.sentinels
            and isinstance(error, ResponseError)
            and str(error).startswith("READONLY")
        ):
            self._closeAll()

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
