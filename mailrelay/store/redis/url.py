"""
The ``[store] redis_url`` setting: ``redis://[[user]:password@]host[:port][/db][?options]``.

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

    @property
    def address(self) -> str:
        """``host:port/db`` for messages (never the password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.db}"


def _count(name: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{name} must be a whole number, not {text!r}")
    return int(text)


def parseRedisURL(url: str) -> RedisURL:
    """The parts of a ``redis://`` URL. Raises ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        # Named by its scheme only: the rest may hold a password.
        raise ValueError(f"not a redis:// URL (scheme {parts.scheme or 'missing'!r})")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("the port must be a number 1..65535") from None
    path = parts.path.strip("/")
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
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        wait=options.get("wait", 0),
        waitTimeoutMs=waitTimeout,
    )
