"""
Delivery status notifications (RFC 3464): the bounce that tells an envelope sender which
recipients failed, and the test that keeps mailrelay from bouncing a bounce.

A bounce is ``multipart/report; report-type=delivery-status`` with three parts: a text for
people (what failed and why), the ``message/delivery-status`` fields for programs, and the
original's header block (less any ``X-IB-*`` option) as ``text/rfc822-headers`` -- never
its body, which may be large and is not the relay's to send anywhere but to its recipients.

The bounce is 7-bit: its text part is quoted-printable UTF-8 when it has more than ASCII,
the original's header likewise when it has 8-bit octets or overlong lines, an address with a
UTF-8 local part is written in the RFC 6533 ``utf-8`` address type's 7-bit form
(``\\x{FC}``), and a non-ASCII diagnostic the same way. The one exception is the ``To:``
field when the envelope sender's own local part is UTF-8: no 7-bit form of it exists, and
delivering to that address takes SMTPUTF8 anyway (RFC 6532 allows the UTF-8 header then).
Every line ends in CRLF and is at most 998 octets.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import ContentTypeHeader
from email.policy import SMTP
from typing import Literal, cast

from mailrelay.headerblock import fieldValue, headerFields, splitMessage
from mailrelay.message.outbound import dateField
from mailrelay.model import Notification, Recipient
from mailrelay.policy.headers import isOptionHeader

REASON_FAILED = "failed"
REASON_EXPIRED = "expired"
SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_EXPIRED = "Undelivered Mail Returned to Sender (delivery time expired)"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
FROM_NAME = "Mail Delivery System"
MAX_DIAGNOSTIC = 900
"""Characters of a remote reply kept in the report (an SMTP reply line is at most 512)."""
MAX_LINE = 998

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9.:\[\]_-]")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient a bounce reports on, and what became of it."""

    recipient: Recipient
    action: Literal["failed", "delayed"]
    status: str
    """RFC 3463 enhanced status code, ``5.1.1``."""
    remoteMta: str | None
    """The host that gave the reply (``mx.example.net``), None when none was reached."""
    diagnostic: str | None
    """The remote reply (``550 5.1.1 No such user``) or a local reason."""
    lastAttempt: datetime


def isDeliveryReport(message: bytes) -> bool:
    """
    Whether ``message`` is a delivery status notification: its top ``Content-Type`` is
    ``multipart/report`` with ``report-type=delivery-status`` (names and values in any case,
    folded or not). Such a message never gets a bounce of its own.
    """
    block, _ = splitMessage(message)
    if b"report" not in block.lower():
        return False  # the common case, without a parse
    for field in headerFields(block):
        if field.name != "content-type":
            continue
        text = fieldValue(block, field).decode("ascii", "replace")
        try:
            parsed = cast(ContentTypeHeader, SMTP.header_factory("content-type", text))
            reportType = parsed.params.get("report-type", "")
        except Exception:
            # The email package has crashed on hostile headers before; an unreadable
            # Content-Type is not a report's.
            return False
        return (
            parsed.content_type == "multipart/report"
            and reportType.strip().lower() == "delivery-status"
        )
    return False


def _xtextUtf8(text: str) -> str:
    """RFC 6533's ``utf-8-addr-xtext``: printable ASCII but ``+ = \\`` as is, every other
    character as ``\\x{HEX}``."""
    out = []
    for char in text:
        code = ord(char)
        if 0x21 <= code <= 0x7E and char not in "+=\\":
            out.append(char)
        else:
            out.append(f"\\x{{{code:02X}}}")
    return "".join(out)


def _recipientField(recipient: Recipient) -> str:
    if recipient.channel == "sms":
        return f"x-e164; {_xtextUtf8(recipient.address)}"
    if recipient.address.isascii():
        return f"rfc822; {_CONTROL.sub('', recipient.address)}"
    return f"utf-8; {_xtextUtf8(recipient.address)}"


def _asciiText(text: str) -> str:
    """One line of printable ASCII: control characters become spaces, other non-ASCII
    characters ``\\x{HEX}``, as in RFC 6533's 7-bit forms."""
    text = _CONTROL.sub(" ", text).strip()
    return "".join(char if char.isascii() else f"\\x{{{ord(char):02X}}}" for char in text)


def _fold(name: str, value: str, width: int = 78) -> str:
    """
    ``Name: value`` folded at spaces into lines of about ``width``, ending in CRLF; ``value``
    is one line of printable ASCII. A word is split only where it would pass MAX_LINE (a
    very long diagnostic): an address is never split, as unfolding would put a space in it.
    """
    lines: list[str] = []
    line = f"{name}:"
    hasWord = False
    for word in value.split(" "):
        if hasWord and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = ""
        line += " " + word
        hasWord = True
        while len(line) > MAX_LINE:
            lines.append(line[:MAX_LINE])
            line = " " + line[MAX_LINE:]
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _host(host: str) -> str:
    return _HOST_UNSAFE.sub("-", host.strip())[:255] or "unknown"


def _status(failed: FailedRecipient) -> str:
    if _STATUS.fullmatch(failed.status.strip()):
        return failed.status.strip()
    return "4.0.0" if failed.action == "delayed" else "5.0.0"


def _deliveryStatus(
    notification: Notification, failed: Sequence[FailedRecipient], hostname: str
) -> str:
    """The ``message/delivery-status`` content: the per-message fields, then one group of
    fields for each recipient, groups separated by empty lines."""
    groups = [
        _fold("Reporting-MTA", f"dns; {hostname}")
        + _fold("X-Mailrelay-Notification-ID", _asciiText(notification.notification_id))
        + _fold("Arrival-Date", dateField(notification.received_at))
    ]
    for entry in failed:
        group = _fold("Final-Recipient", _recipientField(entry.recipient))
        group += _fold("Action", entry.action)
        group += _fold("Status", _status(entry))
        if entry.remoteMta:
            group += _fold("Remote-MTA", f"dns; {_host(entry.remoteMta)}")
        diagnostic = _diagnostic(entry)
        if diagnostic:
            diagnostic = _asciiText(diagnostic)
            # An SMTP reply is "smtp"; a local reason (no 3-digit code) is not one.
            kind = "smtp" if re.match(r"\d{3}\b", diagnostic) else "x-local"
            group += _fold("Diagnostic-Code", f"{kind}; {diagnostic}")
        group += _fold("Last-Attempt-Date", dateField(entry.lastAttempt))
        groups.append(group)
    return "\r\n".join(groups)


def _humanText(
    notification: Notification, failed: Sequence[FailedRecipient], hostname: str, reason: str
) -> str:
    delayed = all(entry.action == "delayed" for entry in failed)
    lines = [f"This is the mail delivery system at {hostname}.", ""]
    if delayed:
        lines.append("Your message has not yet been delivered to the recipients below.")
        lines.append("Delivery is still being retried; you need not send it again.")
    elif reason == REASON_EXPIRED:
        lines.append("Your message could not be delivered to the recipients below within")
        lines.append("the time the relay keeps trying; it has given up.")
    else:
        lines.append("Your message could not be delivered to the recipients below.")
        if reason != REASON_FAILED:
            lines.append(f"Reason: {_CONTROL.sub(' ', reason[:200]).strip()}")
    lines += [
        "",
        f"Notification id: {_CONTROL.sub(' ', notification.notification_id)}",
        f"Received: {dateField(notification.received_at)}",
        "",
    ]
    for entry in failed:
        lines.append(f"<{_CONTROL.sub(' ', entry.recipient.address)}>: {entry.action}")
        if entry.remoteMta:
            lines.append(f"    host {_host(entry.remoteMta)} said:")
        diagnostic = _diagnostic(entry)
        if diagnostic:
            lines.append(f"    {diagnostic}")
        lines.append("")
    lines.append("The header of your message is attached; its body is not.")
    return "\r\n".join(lines) + "\r\n"


def _quotedPrintable(data: bytes) -> bytes:
    """``data`` (CRLF lines) quoted-printable, lines at most 76 octets, CRLF kept."""
    encoded = binascii.b2a_qp(data, istext=True, header=False)
    # b2a_qp follows the first line ending it meets; a block that has none gets CRLF too.
    return re.sub(rb"(?<!\r)\n", b"\r\n", encoded)


def _textPart(text: str) -> bytes:
    if text.isascii():
        return (
            b"Content-Type: text/plain; charset=us-ascii\r\n"
            b"Content-Transfer-Encoding: 7bit\r\n\r\n" + text.encode("ascii")
        )
    return (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        + _quotedPrintable(text.encode("utf-8", "replace"))
    )


def _headersPart(original: bytes) -> bytes:
    block, _ = splitMessage(original)
    # SPEC §8.2: the X-IB-* options never leave, a bounce's copy of the header included
    # (the intake has removed them from what it stored; this holds for any original).
    block = b"".join(
        block[field.start : field.end]
        for field in headerFields(block)
        if not isOptionHeader(field.name)
    )
    if block and not block.endswith(b"\r\n"):
        block += b"\r\n"
    lines = block.split(b"\r\n")
    if (
        block.isascii()
        and b"\r" not in block.replace(b"\r\n", b"")
        and all(len(line) <= MAX_LINE for line in lines)
    ):
        encoding, content = b"7bit", block
    else:
        encoding, content = b"quoted-printable", _quotedPrintable(block)
    return (
        b"Content-Type: text/rfc822-headers\r\n"
        b"Content-Description: Header of the undelivered message\r\n"
        b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + content
    )


def _boundary(parts: Sequence[bytes], seed: bytes) -> bytes:
    """A boundary that no line of ``parts`` starts with, derived from ``seed`` (a bounce
    built twice from the same values is the same bytes)."""
    counter = 0
    while True:
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).hexdigest()[:32]
        boundary = f"=_mailrelay_{digest}".encode("ascii")
        if not any(b"--" + boundary in part for part in parts):
            return boundary
        counter += 1


def _diagnostic(entry: FailedRecipient) -> str | None:
    """The entry's diagnostic without a leading ``host:`` that repeats its remote MTA (the
    status trail's form, ``mx.example.net: 550 5.1.1 No such user``), at most
    MAX_DIAGNOSTIC characters, one line."""
    if not entry.diagnostic:
        return None
    text = entry.diagnostic
    if entry.remoteMta and text.startswith(entry.remoteMta + ":"):
        text = text[len(entry.remoteMta) + 1 :]
    return _CONTROL.sub(" ", text[:MAX_DIAGNOSTIC]).strip() or None


def buildBounce(
    *,
    original: bytes,
    notification: Notification,
    failed: Sequence[FailedRecipient],
    hostname: str,
    now: datetime,
    reason: str,
) -> bytes:
    """
    The delivery status notification telling ``notification.sender`` about ``failed``
    recipients of ``original`` (the message as stored: only its header block is used).

    ``reason`` is ``"failed"`` (a permanent failure), ``"expired"`` (the queue lifetime ran
    out: the subject says so) or a short text naming another reason (shown to the reader).
    When every entry's action is ``delayed`` the report is a delay warning instead. The
    result is ready to queue with a null envelope sender: From ``MAILER-DAEMON@hostname``,
    ``Auto-Submitted: auto-replied``, a Message-ID derived from the notification, the time
    and the recipients. Raises ValueError when there is no one to tell (a null sender or no
    failed recipient).
    """
    if not notification.sender or "@" not in notification.sender:
        raise ValueError("a bounce needs an envelope sender address to go to")
    if not failed:
        raise ValueError("a bounce needs at least one failed recipient")
    hostname = _host(hostname)
    if all(entry.action == "delayed" for entry in failed):
        subject = SUBJECT_DELAYED
    elif reason == REASON_EXPIRED:
        subject = SUBJECT_EXPIRED
    else:
        subject = SUBJECT_FAILED
    parts = [
        _textPart(_humanText(notification, failed, hostname, reason)),
        b"Content-Type: message/delivery-status\r\n"
        b"Content-Description: Delivery report\r\n\r\n"
        + _deliveryStatus(notification, failed, hostname).encode("ascii"),
        _headersPart(original),
    ]
    seed = "\0".join(
        [
            notification.notification_id,
            now.isoformat(),
            hostname,
            *(f"{entry.recipient.key} {entry.action} {entry.status}" for entry in failed),
        ]
    ).encode("utf-8", "surrogateescape")
    boundary = _boundary(parts, seed)
    messageId = f"<{hashlib.sha256(seed).hexdigest()[:24]}.dsn@{hostname}>"
    header = (
        f"From: {FROM_NAME} <MAILER-DAEMON@{hostname}>\r\n"
        # A UTF-8 local part stays UTF-8 here: see the module docstring.
        + f"To: <{_CONTROL.sub('', notification.sender)}>\r\n"
        + f"Subject: {subject}\r\n"
        + f"Date: {dateField(now)}\r\n"
        + f"Message-ID: {messageId}\r\n"
        + "Auto-Submitted: auto-replied\r\n"
        + "MIME-Version: 1.0\r\n"
        + "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        + f'\tboundary="{boundary.decode("ascii")}"\r\n'
    ).encode("utf-8")
    body = b"This is a MIME-encapsulated delivery status notification.\r\n"
    for part in parts:
        body += b"\r\n--" + boundary + b"\r\n" + part
        if not part.endswith(b"\r\n"):
            body += b"\r\n"
    body += b"\r\n--" + boundary + b"--\r\n"
    return header + b"\r\n" + body
