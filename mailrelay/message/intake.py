"""
The bytes the intake stores: a message changed as policy decided at the end of DATA
(:class:`mailrelay.policy.content.ContentDecision`).

What goes out: a ``Received:`` field (given by the caller) on top, the client's header without
the fields policy dropped (``X-IB-*`` options, ``Bcc:``, an empty ``Message-ID:``), a
``Message-ID:`` and a ``Date:`` added when missing, the body -- as it arrived, or with its
attachments stripped. A bare SMS text becomes a text/plain message whose body is the text as
sent.

Speed is the design: the header block is edited as the fields policy found in it
(:mod:`mailrelay.headerblock`), and the body passed through as a view of the bytes that
arrived, so it is copied only where it is stored. Only stripping an attachment parses the MIME
tree again and re-serialises the body.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.utils import format_datetime
from typing import cast

from mailrelay.headerblock import HeaderField, splitMessage
from mailrelay.model import joinText
from mailrelay.policy.content import MIME_POLICY, ContentDecision, MimePart, MimeTree
from mailrelay.policy.decisions import Refusal, RefusalKind

_GENERATOR_POLICY = MIME_POLICY.clone(refold_source="none")
_BARE_TEXT_HEADER = (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
)


@dataclass(frozen=True)
class PreparedMessage:
    """The outcome of :func:`rewriteMessage`: the bytes to store."""

    pieces: tuple[bytes | memoryview, ...]
    """The bytes to store and deliver, CRLF line endings, ``Received:`` on top: in pieces,
    the body a view of the message as it arrived, so that it is copied only where it is
    stored."""
    messageId: str
    """The ``Message-ID`` the message goes out with (the client's or the one added)."""
    strippedAttachments: tuple[str, ...] = ()
    """Names (or content types) of the attachments removed by the ``strip`` option."""

    @property
    def size(self) -> int:
        """How many octets the message has."""
        return sum(map(len, self.pieces))

    @property
    def data(self) -> bytes:
        """The pieces joined."""
        return joinText(self.pieces)


def _newMessageId(notificationId: str | None, hostname: str) -> str:
    return f"<{notificationId or secrets.token_hex(16)}@{hostname}>"


def _messageIdField(messageId: str) -> bytes:
    return b"Message-ID: " + messageId.encode("ascii", "replace") + b"\r\n"


def _dateField(now: datetime) -> bytes:
    # Not outbound.dateField: ``now`` is the clock's, timezone-aware; its rounding and
    # naive-as-UTC reading are for stored times, and cost a fifth more on every message.
    return b"Date: " + format_datetime(now).encode("ascii") + b"\r\n"


def _without(block: bytes, dropped: Sequence[HeaderField]) -> bytes:
    """The header block without the ``dropped`` fields (in order), ending with a CRLF unless
    nothing is left."""
    if dropped:
        kept = []
        position = 0
        for field in dropped:
            kept.append(block[position : field.start])
            position = field.end
        kept.append(block[position:])
        block = b"".join(kept)
    if block and not block.endswith(b"\r\n"):
        block += b"\r\n"  # a header-only message whose last line had no CRLF
    return block


def _strip(message: Message) -> list[str]:
    """Remove the attachments under ``message`` (and multiparts left empty); their names."""
    removed: list[str] = []
    kept: list[Message | str] = []
    for sub in cast(list[Message], message.get_payload()):
        part = MimePart.of(sub)
        if part.isAttachment:
            removed.append(part.description)
            continue
        if sub.is_multipart():
            removed.extend(_strip(sub))
            if not sub.get_payload():
                continue
        kept.append(sub)
    if removed:
        message.set_payload(kept)
    return removed


def _body(root: Message) -> bytes:
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=_GENERATOR_POLICY).flatten(
        cast(EmailMessage, root)
    )
    flattened = out.getvalue()
    return flattened[flattened.index(b"\r\n\r\n") + 4 :]


def _stripAttachments(raw: bytes) -> tuple[tuple[str, ...], bytes]:
    """The names of the attachments removed from ``raw``, and its body without them."""
    try:
        root = MimeTree(raw).root
        removed = _strip(root)
        return tuple(removed), _body(root)
    except Refusal:
        raise
    except Exception:
        # The email package has crashed on hostile input before; policy accepted the
        # message, but what cannot be rewritten is refused for good, not retried.
        raise Refusal(RefusalKind.CONTENT_REFUSED, "The MIME structure cannot be parsed") from None


def rewriteMessage(
    raw: bytes,
    content: ContentDecision,
    *,
    hostname: str,
    now: datetime,
    notificationId: str | None = None,
    received: bytes = b"",
) -> PreparedMessage:
    """
    ``raw`` (the DATA policy judged) changed as ``content`` says, with ``received`` (from
    :func:`mailrelay.message.received.receivedHeader`) on top: the bytes to store.

    ``notificationId`` is the id the message will have, for the ``Message-ID`` added
    (``<notificationId@hostname>``; a random id when None); ``now`` is the added ``Date:``.

    Raises ``Refusal(CONTENT_REFUSED)`` when the attachments to strip cannot be: a message
    that cannot be rewritten is refused for good.
    """
    messageId = content.messageId
    added: list[bytes] = []
    if messageId is None:
        messageId = _newMessageId(notificationId, hostname)
        added.append(_messageIdField(messageId))
    if content.addDate:
        added.append(_dateField(now))
    if content.bareText:
        header = b"".join([_BARE_TEXT_HEADER, *added, b"\r\n"])
        text = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
        return PreparedMessage(
            pieces=(received, header, text) if received else (header, text),
            messageId=messageId,
        )
    stripped: tuple[str, ...] = ()
    newBody = None
    if content.stripAttachments:
        stripped, newBody = _stripAttachments(raw)
    pieces: tuple[bytes | memoryview, ...]
    if not (content.dropFields or added or stripped):
        pieces = (received, raw) if received else (raw,)
    else:
        block, bodyStart = splitMessage(raw)
        body: bytes | memoryview = memoryview(raw)[bodyStart:] if newBody is None else newBody
        pieces = (received, _without(block, content.dropFields), *added, b"\r\n", body)
    return PreparedMessage(
        pieces=tuple(piece for piece in pieces if piece),
        messageId=messageId,
        strippedAttachments=stripped,
    )
