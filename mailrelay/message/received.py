"""
The ``Received:`` trace header mailrelay puts on top of each accepted message (RFC 5321 §4.4).

It says which client (HELO name, reverse name, IP) handed the message to which relay, how
(``ESMTP``, ``ESMTPS`` with TLS, ``ESMTPA`` authenticated, ``ESMTPSA`` both: RFC 3848), under
which notification id, and when. It never names the account, the user name or any secret, and
every client-supplied text is reduced to printable ASCII so it cannot inject a header.
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
from collections.abc import Sequence
from datetime import UTC, datetime

from mailrelay.model import Recipient

MAX_FIELD = 255
_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\;]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _clean(text: str, default: str = "unknown") -> str:
    """Client-supplied text made safe inside a header: printable ASCII, no comment syntax."""
    cleaned = _UNSAFE.sub("?", text.strip())[:MAX_FIELD]
    return cleaned or default


@functools.lru_cache(maxsize=4096)
def _literal(clientAddress: str) -> str:
    try:
        address = ipaddress.ip_address(clientAddress)
    except ValueError:
        return _clean(clientAddress)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed}]"
    return f"[{address}]"


@functools.lru_cache(maxsize=8)
def _dateField(second: datetime) -> str:
    """RFC 5322 date-time of a whole second; many messages share one, so it is cached."""
    return email.utils.format_datetime(second)


def receivedHeader(
    *,
    hostname: str,
    helo: str,
    clientAddress: str,
    tlsInfo: str | None,
    authenticated: bool,
    notificationId: str,
    now: datetime,
    recipients: Sequence[Recipient] = (),
    reverseName: str | None = None,
) -> bytes:
    """
    The complete ``Received:`` field, folded, ending in CRLF, to put before the message.

    ``tlsInfo`` is None without TLS, else a short description (``TLSv1.3
    TLS_AES_256_GCM_SHA384``); the ``for <address>`` clause is given only when the message
    has exactly one e-mail recipient, so a copy never tells its reader about the others.
    ``now`` without a time zone is taken as UTC.
    """
    lines = [*_fromAndBy(hostname, helo, clientAddress, tlsInfo, authenticated, reverseName)]
    lines.append(f"id {_clean(notificationId)}")
    if len(recipients) == 1 and recipients[0].channel == "email":
        # A checked address, UTF-8 allowed (SMTPUTF8); no control character, whatever let
        # one through.
        lines.append(f"for <{_CONTROL.sub('?', recipients[0].address)}>")
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    lines[-1] += ";"
    lines.append(_dateField(now.replace(microsecond=0)))
    return ("\r\n\t".join(lines) + "\r\n").encode("utf-8", "replace")


@functools.lru_cache(maxsize=1024)
def _fromAndBy(
    hostname: str,
    helo: str,
    clientAddress: str,
    tlsInfo: str | None,
    authenticated: bool,
    reverseName: str | None,
) -> tuple[str, str]:
    """The field's ``from`` and ``by`` lines: the same for every message of a session, so
    they are made once for it."""
    tcpInfo = _literal(clientAddress)
    if reverseName:
        tcpInfo = f"{_clean(reverseName)} {tcpInfo}"
    protocol = "ESMTP" + ("S" if tlsInfo is not None else "") + ("A" if authenticated else "")
    by = f"by {_clean(hostname)} with {protocol}"
    if tlsInfo is not None:
        words = " ".join(_clean(word) for word in tlsInfo.split()[:4]) or "TLS"
        by += f" (using {words})"
    return f"Received: from {_clean(helo)} ({tcpInfo})", by
