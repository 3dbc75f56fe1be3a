"""
The ``[store] redis_url`` setting, one of:

- ``redis://[[user]:password@]host[:port][/db][?options]``: one server;
- ``redis-sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?options]``:
  the primary of ``service`` as the Redis Sentinels at those addresses (port 26379 unless
  given) name it, followed through failovers. The user and password are the primary's (and its
  replicas'); the sentinels are asked without.

Options (query parameters):

- ``wait=N``: after each enqueue, ``WAIT N <wait_timeout>`` -- the message counts as stored
  only once N replicas acknowledged it (default 0: no WAIT, the primary's acknowledgement is
  enough).
- ``wait_timeout=MS``: how long that WAIT may take, in milliseconds (default 1000).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_WAIT_TIMEOUT_MS = 1000


@dataclass(frozen=True)
class RedisURL:
    """Where the Redis server is and how to use it; parse one with :func:`parseRedisURL`."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    wait: int = 0
    waitTimeoutMs: int = DEFAULT_WAIT_TIMEOUT_MS
    sentinels: tuple[tuple[str, int], ...] = ()
    """The sentinels' addresses; empty: ``host`` and ``port`` are the server's."""
    service: str = ""
    """The name the sentinels monitor the primary under (with ``sentinels`` only)."""

    @property
    def address(self) -> str:
        """``host:port/db``, or ``service/db via sentinels h:p,...``, for messages (never the
        password)."""
        if self.sentinels:
            via = ",".join(_hostPort(host, port) for host, port in self.sentinels)
            return f"{self.service}/{self.db} via sentinels {via}"
        return f"{_hostPort(self.host, self.port)}/{self.db}"


def _hostPort(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _count(name: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{name} must be a whole number, not {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise ValueError("the port must be a number 1..65535")
    return int(text)


def _sentinelAddresses(hosts: str) -> tuple[tuple[str, int], ...]:
    """``host[:port],...`` (IPv6 addresses in brackets) as (host, port) pairs."""
    addresses = []
    for item in hosts.split(","):
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"not a sentinel address: {item!r}")
            port = _port(rest[1:]) if rest else DEFAULT_SENTINEL_PORT
        else:
            host, colon, portText = item.partition(":")
            port = _port(portText) if colon else DEFAULT_SENTINEL_PORT
        if not host:
            raise ValueError("a sentinel address without a host")
        addresses.append((host, port))
    return tuple(addresses)


def parseRedisURL(url: str) -> RedisURL:
    """The parts of a ``redis://`` or ``redis-sentinel://`` URL. Raises ValueError naming
    what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "redis-sentinel"):
        # Named by its scheme only: the rest may hold a password.
        raise ValueError(
            f"not a redis:// URL or a redis-sentinel:// one (scheme {parts.scheme or 'missing'!r})"
        )
    path = parts.path.strip("/")
    sentinels: tuple[tuple[str, int], ...] = ()
    service = ""
    if parts.scheme == "redis-sentinel":
        sentinels = _sentinelAddresses(parts.netloc.rpartition("@")[2])
        service, _, path = path.partition("/")
        if not service:
            raise ValueError("a redis-sentinel:// URL names the service: /<service>[/<db>]")
        port = DEFAULT_PORT
    else:
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError("the port must be a number 1..65535") from None
    db = _count("the database number", path) if path else 0
    options = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in ("wait", "wait_timeout"):
            raise ValueError(f"unknown option {name!r} (known: wait, wait_timeout)")
        options[name] = _count(name, value)
    waitTimeout = options.get("wait_timeout", DEFAULT_WAIT_TIMEOUT_MS)
    if waitTimeout <= 0:
        raise ValueError("wait_timeout must be at least 1 (ms)")
    return RedisURL(
        host="" if sentinels else parts.hostname or "127.0.0.1",
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        wait=options.get("wait", 0),
        waitTimeoutMs=waitTimeout,
        sentinels=sentinels,
        service=unquote(service),
    )
