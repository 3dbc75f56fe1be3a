"""
A stored message made ready to leave (SPEC §8.2): what the delivery worker sends.

The intake has already put a ``Received:`` field on top, removed the ``X-IB-*`` options and
added a ``Message-ID:`` and a ``Date:`` where they were missing
(:func:`mailrelay.message.intake.rewriteMessage`). :func:`prepareForDelivery` does the last
three again, so that no message leaves without them whatever stored it (a message queued by an
older release, a bounce, an operator's re-injection). It edits the header block only, as
lines; the body is passed through as the same bytes.

Nothing here refuses a message: it has been accepted, and a header that does not parse is left
as it is rather than stopping the delivery.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.headerregistry import AddressHeader
from email.policy import SMTP
from email.utils import format_datetime
from typing import cast

from mailrelay.headerblock import fieldValue, headerFields, splitMessage
from mailrelay.policy.addresses import AddressSyntaxError, mailboxFromParts, parseMailbox
from mailrelay.policy.headers import OPTION_PREFIX, isOptionHeader

# What a Message-ID's id-left / id-right may hold here (dot-atom text, no dot at the ends).
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")


def _idPart(text: str, default: str) -> str:
    cleaned = _ID_UNSAFE.sub("-", text).strip(".")
    return cleaned or default


def messageIdFor(notificationId: str, hostname: str) -> str:
    """
    The ``Message-ID`` a message leaving without one gets: ``<notificationId@hostname>``, of
    the form the intake adds (which leaves nothing for this to add, but for messages queued by
    other means), the same on every retry. Characters a msg-id may not hold are replaced.
    """
    return f"<{_idPart(notificationId, 'unknown')}@{_idPart(hostname, 'localhost')}>"


def dateField(when: datetime) -> str:
    """The RFC 5322 date-time of ``when`` (whole seconds; without a time zone taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return format_datetime(when.replace(microsecond=0))


def prepareForDelivery(
    message: bytes, *, hostname: str, notificationId: str, receivedAt: datetime
) -> bytes:
    """
    ``message`` as it goes out: every ``X-IB-*`` field removed (any case, with its
    continuation lines), and a ``Message-ID:`` (:func:`messageIdFor`) and a ``Date:`` (the
    time it was received) added at the end of the header when it has none. A ``Message-ID:``
    with an empty value is replaced.

    The same input gives the same bytes every time, and preparing a prepared message changes
    nothing. The body is not touched; the header's other lines keep their bytes.
    """
    block, bodyStart = splitMessage(message)
    if _nothingToDo(block):
        return message
    kept: list[bytes] = []
    changed = False
    hasMessageId = hasDate = False
    for field in headerFields(block):
        if isOptionHeader(field.name):
            changed = True
            continue
        if field.name == "message-id":
            if not fieldValue(block, field).strip():
                changed = True
                continue
            hasMessageId = True
        elif field.name == "date":
            hasDate = True
        kept.append(block[field.start : field.end])
    added = []
    if not hasMessageId:
        added.append(f"Message-ID: {messageIdFor(notificationId, hostname)}\r\n")
    if not hasDate:
        added.append(f"Date: {dateField(receivedAt)}\r\n")
    if not (changed or added):
        return message
    if kept and not kept[-1].endswith(b"\r\n"):
        kept[-1] += b"\r\n"  # a header-only message whose last line had no CRLF
    return b"".join(
        [*kept, "".join(added).encode("ascii"), b"\r\n", memoryview(message)[bodyStart:]]
    )


def _nothingToDo(block: bytes) -> bool:
    """
    Whether the header ``block`` certainly leaves :func:`prepareForDelivery` unchanged: no
    ``X-IB-`` anywhere in it, one ``Message-ID:`` with a value on its own line, and a
    ``Date:``. A look at a lowered copy, not a parse (a message the intake stored is always
    like this, and the parse was a tenth of the delivery's CPU); when unsure it says no, and
    the parse decides.
    """
    lowered = b"\r\n" + block.lower()  # fields start after a CRLF, as the parse reads them
    if OPTION_PREFIX.encode() in lowered or b"\r\ndate:" not in lowered:
        return False
    if lowered.count(b"\r\nmessage-id:") != 1:
        return False
    start = lowered.index(b"\r\nmessage-id:") + len(b"\r\nmessage-id:")
    end = lowered.find(b"\r\n", start)
    return bool(lowered[start : end if end >= 0 else len(lowered)].strip())


def _domainOf(text: str) -> str | None:
    """The normal-form domain of an address written ``text``, or None (a literal, or none)."""
    try:
        domain = parseMailbox(text).domain
    except AddressSyntaxError:
        return None
    return None if domain.startswith("[") else domain


def _fromDomain(block: bytes) -> str | None:
    fields = [field for field in headerFields(block) if field.name == "from"]
    if len(fields) != 1:
        return None
    text = fieldValue(block, fields[0]).decode("utf-8", "surrogateescape")
    try:
        parsed = cast(AddressHeader, SMTP.header_factory("from", text))
        addresses = parsed.addresses
    except Exception:
        # The email package has crashed on hostile headers before; an unreadable From:
        # is not this function's to refuse: the envelope sender decides then.
        return None
    if not addresses:
        return None
    try:
        mailbox = mailboxFromParts(addresses[0].username, addresses[0].domain)
    except AddressSyntaxError:
        return None
    return None if mailbox.domain.startswith("[") else mailbox.domain


def senderDomain(message: bytes, envelopeSender: str) -> str | None:
    """
    The domain to sign ``message`` for: the domain of the (first) address of its ``From:``
    header, else that of ``envelopeSender``; lower-case, IDNA A-label form
    (``xn--bcher-kva.de``). None when neither gives a domain: no or several From: fields or
    an unreadable one, and a null or non-address (SMS sender id) envelope sender, or an
    address literal (``[192.0.2.1]``).
    """
    block, _ = splitMessage(message)
    return _fromDomain(block) or (_domainOf(envelopeSender) if envelopeSender else None)
