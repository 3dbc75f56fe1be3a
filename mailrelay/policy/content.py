"""
The end-of-DATA step: the account's content rules, and the bytes that will be stored.

Speed is the design: most messages need nothing but their header. The header block (up to the
first empty line) is split off and checked line by line here; the fields a rule needs (From:,
To:/Cc:, a multipart Content-Type) are parsed by ``email.policy.SMTP``'s header classes, after
a fast path for the common ``Name <addr@domain>`` forms; the block is edited as lines and the
body passed through as the same bytes. The whole MIME tree is parsed with
``BytesParser(policy=_POLICY)``, once, only when a rule needs the structure: "text and html" or
attachments strip/refuse on a multipart message, and the text of an SMS. Only stripping an
attachment re-serialises the body.

What goes out: a ``Received:`` field (given by the caller) on top, the client's header without
``X-IB-*`` options and without ``Bcc:`` (the envelope already says who gets a blind copy; the
header would tell everyone), a ``Message-ID:`` and a ``Date:`` added when missing, the body.
"""

from __future__ import annotations

import contextlib
import email.errors
import functools
import io
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.generator import BytesGenerator
from email.headerregistry import (
    AddressHeader,
    BaseHeader,
    ContentDispositionHeader,
    ContentTypeHeader,
    HeaderRegistry,
)
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.policy import SMTP
from email.utils import format_datetime
from itertools import islice
from typing import cast

from mailrelay.model import Account, HeaderOptions, Recipient, Sender, joinText
from mailrelay.policy.addresses import (
    AddressSyntaxError,
    Mailbox,
    mailboxFromParts,
    parseMailbox,
)
from mailrelay.policy.decisions import Refusal, RefusalKind
from mailrelay.policy.headers import (
    KNOWN_OPTIONS,
    OPTION_PREFIX,
    parseHeaderOptions,
)
from mailrelay.policy.phones import PhoneNumberError, isSmsDomain, normalisePhoneNumber
from mailrelay.policy.senders import (
    EnvelopeSender,
    SenderIdError,
    checkHeaderSenders,
    normaliseSenderId,
)
from mailrelay.policy.sms import SmsLength, checkSmsText

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
# The common From:/To: forms: ``addr@domain``, ``Name <addr@domain>``, ``"Name" <addr@domain>``.
_ADDR_SPEC = r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)"
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:(?:\"[^\"\\]*\"|[A-Za-z0-9 .'_-]*)[ \t]*<{_ADDR_SPEC}>|{_ADDR_SPEC})[ \t]*"
)
_HEADER_REGISTRY = HeaderRegistry()
MAX_HEADER_BLOCK = 256 * 1024
"""The largest header block accepted (a To: of 1,000 addresses is ~40 KiB; Postfix's
``header_size_limit`` is 100 KiB): the header is parsed field by field on the reactor
thread, and a message's size limit alone would let it be many megabytes."""
_MOST_CACHED_HEADER = 1024
_MALFORMED_ADDRESS_LIST = (
    email.errors.InvalidHeaderDefect,
    email.errors.NonPrintableDefect,
    email.errors.HeaderMissingRequiredValue,
)
"""Defects of an address field's parse that refuse it: the ``email`` parser then keeps what
it could read (the first address of ``b@acme.example <a@evil.com>``) and drops the rest,
which a mail client or a DMARC check may read differently. Only the spacing around an
encoded-word is forgiven (``email`` itself writes ``<jo@=?utf-8?q?b=C3=BCcher?=.de>``)."""


def _isMalformedAddressList(defect: email.errors.MessageDefect) -> bool:
    if not isinstance(defect, _MALFORMED_ADDRESS_LIST):
        return False
    return "encoded-word" not in str(defect) and "encoded word" not in str(defect)


def _headerFactory(name: str, value: str) -> BaseHeader:
    """
    ``email.policy.SMTP``'s header factory, remembered for short values: the parser asks for
    a part's parsed Content-Type a dozen times, and each time parses it again; header objects
    are immutable. Long values are parsed each time (a parsed header holds ~100 times its
    text in memory, and the cache would keep 512 of them).
    """
    if len(value) <= _MOST_CACHED_HEADER:
        return _cachedHeader(name, value)
    return cast(BaseHeader, _HEADER_REGISTRY(name, value))


@functools.lru_cache(maxsize=512)
def _cachedHeader(name: str, value: str) -> BaseHeader:
    return cast(BaseHeader, _HEADER_REGISTRY(name, value))


_POLICY = SMTP.clone(header_factory=_headerFactory)
_GENERATOR_POLICY = _POLICY.clone(refold_source="none")
_BROKEN_STRUCTURE = (
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
    email.errors.InvalidMultipartContentTransferEncodingDefect,
)
_REMOVED_FIELDS = frozenset({"bcc"})


@dataclass(frozen=True)
class PreparedMessage:
    """The outcome of :func:`prepareMessage` for a message it accepts."""

    pieces: tuple[bytes | memoryview, ...]
    """The bytes to store and deliver, CRLF line endings, ``Received:`` on top: in pieces,
    the body a view of the message as it arrived, so that it is copied only where it is
    stored."""
    options: HeaderOptions
    fromAddress: str | None
    """The From: header's (first) address in normal form; None when there is no From:."""
    messageId: str
    """The ``Message-ID`` the message goes out with (the client's or the one added)."""
    smsText: str | None = None
    """The text to send to the SMS recipients; None when there are none."""
    smsLength: SmsLength | None = None
    strippedAttachments: tuple[str, ...] = ()
    """Names (or content types) of the attachments removed by the ``strip`` option."""
    ignoredOptions: tuple[str, ...] = ()
    """``X-IB-*`` header names mailrelay does not know: removed, otherwise ignored."""

    @property
    def size(self) -> int:
        """How many octets the message has."""
        return sum(map(len, self.pieces))

    @property
    def data(self) -> bytes:
        """The pieces joined."""
        return joinText(self.pieces)


def _refuse(reason: str) -> Refusal:
    return Refusal(RefusalKind.CONTENT_REFUSED, reason)


@contextlib.contextmanager
def _hostile(reason: str) -> Iterator[None]:
    """
    Turn an exception from the ``email`` package into a refusal giving ``reason``: its parsers
    have crashed on hostile input before (IndexError, AttributeError, LookupError...), and
    such a message must be refused for good, not answered with a temporary failure that makes
    the client retry it forever.
    """
    try:
        yield
    except Refusal:
        raise
    except Exception:
        raise _refuse(reason) from None


def checkSize(size: int, account: Account, limit: int | None = None) -> None:
    """
    Whether a message of ``size`` octets (declared with SIZE=, or received) is within the
    account's ``max_message_size`` and ``limit`` (the configured one, when the caller has not
    already enforced it); raises ``Refusal(SIZE_EXCEEDED)`` when it is not.
    """
    limits = [n for n in (account.max_message_size, limit) if n is not None]
    if limits and size > min(limits):
        raise Refusal(
            RefusalKind.SIZE_EXCEEDED,
            f"Message is {size} octets; account {account.name} accepts at most {min(limits)}",
        )


@dataclass
class _Field:
    name: str
    first: int
    end: int


class _Header:
    """
    The header block, checked line by line, with each field's place among the lines. Values
    are parsed by the ``email`` package's header classes only when a rule asks for them.
    """

    def __init__(self, block: bytes) -> None:
        if len(block) > MAX_HEADER_BLOCK:
            raise _refuse(f"The header is larger than {MAX_HEADER_BLOCK // 1024} KiB")
        self.block = block
        self.lines = block.split(b"\r\n") if block else []
        self.fields: list[_Field] = []
        lineEndings = block.count(b"\r\n")
        if block.count(b"\r") > lineEndings or block.count(b"\n") > lineEndings:
            raise Refusal(RefusalKind.BARE_LINE_ENDING)  # a CR or LF not part of a CRLF
        if b"\x00" in block:
            raise _refuse("The header contains a NUL character")
        for i, line in enumerate(self.lines):
            if line[:1] in (b" ", b"\t"):
                if not self.fields:
                    raise _refuse("The header starts with a continuation line")
                self.fields[-1].end = i + 1
                continue
            match = _FIELD_NAME.match(line)
            if match is None:
                raise _refuse(
                    f"Line {i + 1} of the header is not a header field (Name: value); "
                    "is the empty line between header and body missing?"
                )
            self.fields.append(_Field(match.group(1).decode("ascii").lower(), i, i + 1))

    def named(self, name: str) -> list[_Field]:
        return [field for field in self.fields if field.name == name]

    def value(self, field: _Field) -> bytes:
        """The field's value, unfolded (RFC 5322 §2.2.3: the CRLFs removed)."""
        first = self.lines[field.first]
        return b"".join([first[first.index(b":") + 1 :], *self.lines[field.first + 1 : field.end]])

    def text(self, field: _Field) -> str:
        """The value as the ``email`` package reads it: leading blanks gone, 8-bit kept."""
        return self.value(field).lstrip(b" \t").decode("utf-8", "surrogateescape")

    def parsed(self, field: _Field) -> BaseHeader:
        """The field parsed by ``email.policy.SMTP``'s header classes."""
        with _hostile(f"The {field.name.title()}: header cannot be parsed"):
            return _headerFactory(field.name, self.text(field))

    @functools.cached_property
    def message(self) -> Message:
        """The whole header as an ``email`` message without body, for the rarer rules."""
        with _hostile("The header cannot be parsed"):
            return BytesHeaderParser(policy=_POLICY).parsebytes(self.block + b"\r\n\r\n")

    def without(self, removed: Sequence[_Field]) -> bytes:
        if not removed:
            return self.block
        gone = {i for field in removed for i in range(field.first, field.end)}
        return b"\r\n".join(line for i, line in enumerate(self.lines) if i not in gone)


def _split(raw: bytes) -> tuple[bytes, int]:
    """The header block (without its final CRLF) and where the body starts (after the empty
    line; ``len(raw)`` when there is no body)."""
    if raw.startswith(b"\r\n"):
        return b"", 2
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return (raw[:-2] if raw.endswith(b"\r\n") else raw), len(raw)
    return raw[:end], end + 4


def _options(header: _Header) -> tuple[HeaderOptions, list[_Field], tuple[str, ...]]:
    # Field names are lower-cased already: a prefix test is isOptionHeader without the call.
    fields = [field for field in header.fields if field.name.startswith(OPTION_PREFIX)]
    if not fields:
        return HeaderOptions(), [], ()
    pairs = []
    for field in fields:
        try:
            pairs.append((field.name, header.value(field).decode("utf-8")))
        except UnicodeDecodeError:
            raise _refuse(f"Header X-IB-{field.name[5:]}: is not UTF-8") from None
    ignored = tuple(sorted({name for name, _ in pairs if name not in KNOWN_OPTIONS}))
    return parseHeaderOptions(pairs), fields, ignored


def _simpleMailbox(text: str) -> Mailbox | None:
    """The address of a ``From:``-style value in its common simple forms, without the slow
    RFC 5322 parser; None for anything else (the parser then decides)."""
    match = _SIMPLE_ADDRESS.fullmatch(text)
    if match is None:
        return None
    try:
        return parseMailbox(match.group(1) or match.group(2))
    except AddressSyntaxError:
        return None


def _addresses(header: _Header, name: str) -> list[Mailbox]:
    """The addresses of every ``name`` field, each in normal form; unreadable ones refused."""
    mailboxes = []
    for field in header.named(name):
        simple = _simpleMailbox(header.text(field))
        if simple is not None:
            mailboxes.append(simple)
            continue
        parsed = header.parsed(field)
        if any(_isMalformedAddressList(d) for d in parsed.defects):
            raise _refuse(f"The {name.title()}: header is not a valid address list")
        for address in cast(AddressHeader, parsed).addresses:
            try:
                mailboxes.append(mailboxFromParts(address.username, address.domain))
            except AddressSyntaxError as e:
                display = name.title()
                raise _refuse(f"The {display}: header has an invalid address: {e}") from None
    return mailboxes


def _checkFrom(
    header: _Header,
    account: Account,
    senders: Sequence[Sender],
    envelopeSender: EnvelopeSender | None,
    hasEmailRecipients: bool,
) -> Mailbox | None:
    fields = header.named("from")
    if not fields:
        if hasEmailRecipients:
            raise _refuse("The message has no From: header")
        return None
    if len(fields) > 1:
        raise _refuse("The message has more than one From: header")
    if envelopeSender is not None and envelopeSender.kind == "sms":
        written = header.value(fields[0]).strip(b" \t").decode("ascii", "replace")
        try:
            if normaliseSenderId(written) == envelopeSender.value:
                return None
        except SenderIdError:
            pass  # not a sender id: an address, checked below
    mailboxes = _addresses(header, "from")
    if not mailboxes:
        raise _refuse("The From: header has no address")
    checkHeaderSenders(mailboxes, account, senders)
    return mailboxes[0]


def _recipientKey(mailbox: Mailbox, smsDomains: Sequence[str]) -> tuple[str, str]:
    if isSmsDomain(mailbox.domain, smsDomains):
        try:
            return ("sms", normalisePhoneNumber(mailbox.local))
        except PhoneNumberError:
            pass
    return ("email", str(mailbox))


def _checkRcptHeaders(
    header: _Header, recipients: Sequence[Recipient], smsDomains: Sequence[str]
) -> None:
    envelope = {(r.channel, r.address) for r in recipients}
    for name, display in (("to", "To"), ("cc", "Cc")):
        for mailbox in _addresses(header, name):
            if _recipientKey(mailbox, smsDomains) not in envelope:
                raise _refuse(
                    f"{display}: {mailbox} is not among the RCPT TO recipients; "
                    "this account requires every To:/Cc: address to be one"
                )


@dataclass(frozen=True)
class _Part:
    """One MIME part with what the rules ask of it, its headers parsed once."""

    message: Message
    contentType: str
    filename: str | None
    isAttachment: bool

    @classmethod
    def of(cls, part: Message) -> _Part:
        header = cast(ContentTypeHeader | None, part.get("content-type"))
        if header is None:
            contentType, params = part.get_default_type(), {}
        else:
            contentType, params = header.content_type, dict(header.params)
        disposition = cast(ContentDispositionHeader | None, part.get("content-disposition"))
        kind, filename = None, None
        if disposition is not None:
            kind, filename = disposition.content_disposition, disposition.params.get("filename")
        filename = (filename or params.get("name") or "").strip() or None
        if contentType.startswith("message/"):
            isAttachment = True  # a forwarded message is a file, whatever its disposition
        elif kind:
            isAttachment = kind == "attachment"
        else:
            isAttachment = filename is not None and not contentType.startswith("multipart/")
        return cls(part, contentType, filename, isAttachment)

    @property
    def description(self) -> str:
        return self.filename or self.contentType


MAX_MULTIPARTS = 32
_BOUNDARY_PARAMETER = re.compile(rb"boundary[ \t]*=", re.IGNORECASE)


class _Tree:
    """The MIME tree, parsed on first use (the one full parse a message may get)."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._root: Message | None = None

    @property
    def root(self) -> Message:
        if self._root is None:
            # The parser checks every line against the boundary of every open multipart, so
            # its time grows with lines x depth (300 levels: 2 s for 1.7 MB, on the reactor
            # thread). Each multipart declares a boundary; real mail has a handful.
            declared = _BOUNDARY_PARAMETER.finditer(self._raw)
            if next(islice(declared, MAX_MULTIPARTS, None), None) is not None:
                raise _refuse(f"The message has more than {MAX_MULTIPARTS} multipart parts")
            with _hostile("The MIME structure cannot be parsed"):
                self._root = BytesParser(policy=_POLICY).parsebytes(self._raw)
                defects = [d for part in self._root.walk() for d in part.defects]
            for defect in defects:
                if isinstance(defect, _BROKEN_STRUCTURE):
                    raise _refuse(f"The MIME structure is broken: {defect.__doc__ or defect}")
        return self._root


def _leaves(message: Message) -> Iterator[_Part]:
    """Every leaf of the tree, and every attachment (which is not entered)."""
    part = _Part.of(message)
    if not part.isAttachment and message.is_multipart():
        for sub in cast(list[Message], message.get_payload()):
            yield from _leaves(sub)
    else:
        yield part


def _checkAlternative(root: Message) -> None:
    types = {part.contentType for part in _leaves(root) if not part.isAttachment}
    missing = [t for t in ("text/plain", "text/html") if t not in types]
    if missing:
        raise _refuse(
            f"This account requires both a text/plain and a text/html part; "
            f"the message has no {' and no '.join(missing)} part"
        )


def _strip(message: Message) -> list[str]:
    """Remove the attachments under ``message`` (and multiparts left empty); their names."""
    removed: list[str] = []
    kept: list[Message | str] = []
    for sub in cast(list[Message], message.get_payload()):
        part = _Part.of(sub)
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


def _plainText(root: Message) -> str | None:
    """The text of the first text/plain part that is not an attachment, line endings as
    ``\n``, trailing white space gone; None when there is no such part."""
    for part in _leaves(root):
        if not part.isAttachment and part.contentType == "text/plain":
            with _hostile("The text/plain part cannot be decoded (charset or encoding)"):
                text = cast(EmailMessage, part.message).get_content()
            return str(text).replace("\r\n", "\n").rstrip()
    return None


def _smsText(root: Message, account: Account) -> tuple[str, SmsLength]:
    text = _plainText(root)
    if text is None:
        raise _refuse("A message to a phone number needs a text/plain body")
    if not text:
        raise _refuse("The text/plain body is empty; there is nothing to send as SMS")
    return text, checkSmsText(text, account.sms_segments)


def smsTextOf(message: bytes) -> str:
    """
    The SMS text of a message as stored (what :func:`prepareMessage` measured when it accepted
    it: the first text/plain part); for the delivery side. Raises ValueError when the message
    has none or cannot be read.
    """
    try:
        text = _plainText(_Tree(message).root)
    except Refusal as e:
        raise ValueError(e.reason) from None
    if not text:
        raise ValueError("the message has no text/plain part")
    return text


_MESSAGE_FIELDS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "reply-to",
        "sender",
        "received",
    }
)
"""Fields that make a DATA section to phone numbers a message rather than bare text."""


def _isBareText(blockBytes: bytes) -> bool:
    """
    Whether a DATA section sent only to phone numbers is the SMS text itself (SPEC §5): its
    first lines do not read as a header, or read as one only by chance (``Note: at 5``) --
    no field of a message (From:, Subject:, Content-Type:, an ``X-IB-`` option...) among them.
    """
    try:
        header = _Header(blockBytes)
    except Refusal:
        return True
    return not any(
        f.name in _MESSAGE_FIELDS or f.name.startswith(OPTION_PREFIX) for f in header.fields
    )


def _prepareBareText(
    raw: bytes,
    account: Account,
    *,
    hostname: str,
    now: datetime,
    notificationId: str | None,
    received: bytes,
) -> PreparedMessage:
    """A header-less DATA section as a text/plain message whose body is the text as sent."""
    lineEndings = raw.count(b"\r\n")
    if raw.count(b"\r") > lineEndings or raw.count(b"\n") > lineEndings:
        raise Refusal(RefusalKind.BARE_LINE_ENDING)
    if b"\x00" in raw:
        raise _refuse("The text contains a NUL character")
    try:
        text = raw.decode("utf-8").replace("\r\n", "\n").rstrip()
    except UnicodeDecodeError:
        raise _refuse("An SMS text without a header must be UTF-8") from None
    if not text:
        raise _refuse("The text is empty; there is nothing to send as SMS")
    length = checkSmsText(text, account.sms_segments)
    messageId = f"<{notificationId or secrets.token_hex(16)}@{hostname}>"
    header = (
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"Message-ID: " + messageId.encode("ascii", "replace") + b"\r\n"
        b"Date: " + format_datetime(now).encode("ascii") + b"\r\n\r\n"
    )
    body = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    pieces = (received, header, body) if received else (header, body)
    return PreparedMessage(
        pieces=pieces,
        options=HeaderOptions(),
        fromAddress=None,
        messageId=messageId,
        smsText=text,
        smsLength=length,
    )


def _contentType(header: _Header) -> tuple[str, str | None]:
    """The message's content type and, for a multipart, its boundary (parsed only then)."""
    fields = header.named("content-type")
    if not fields:
        return "text/plain", None
    if b"multipart" not in header.value(fields[0]).lower():
        # Not a multipart; the exact type matters to no rule on this path.
        return "text/plain", None
    parsed = cast(ContentTypeHeader, header.parsed(fields[0]))
    return parsed.content_type, parsed.params.get("boundary")


def _checkRootStructure(raw: bytes, bodyStart: int, boundary: str | None) -> None:
    """The MIME check the header alone allows: a multipart's boundary must be in the body."""
    if not boundary:
        raise _refuse("The message is multipart but names no boundary")
    if raw.find(b"--" + boundary.encode("utf-8", "surrogateescape"), bodyStart) < 0:
        raise _refuse("The MIME boundary never appears in the body")


def _structureRules(
    raw: bytes, header: _Header, account: Account, isMultipart: bool, hasSms: bool
) -> tuple[list[str], bytes | None, str | None, SmsLength | None]:
    """
    The rules that need the MIME structure, sharing one parse: text-and-html, attachments,
    SMS text. Returns the stripped attachments' names, the new body if it changed, and the
    SMS text and its measure when there are SMS recipients.
    """
    tree = _Tree(raw)
    if account.require_alternative:
        if not isMultipart:
            raise _refuse(
                "This account requires both a text/plain and a text/html part "
                "(multipart/alternative); the message has only one part"
            )
        _checkAlternative(tree.root)
    stripped: list[str] = []
    body = None
    if account.attachments != "allow":
        if not isMultipart:
            part = _Part.of(header.message)
            if part.isAttachment:
                raise _refuse(f"The message is only an attachment ({part.description})")
        attachments = []
        if isMultipart:
            attachments = [p.description for p in _leaves(tree.root) if p.isAttachment]
        if attachments and account.attachments == "refuse":
            raise _refuse(f"This account does not accept attachments (found {attachments[0]})")
        if attachments:
            stripped = _strip(tree.root)
            body = _body(tree.root)
    if not hasSms:
        return stripped, body, None, None
    smsText, smsLength = _smsText(tree.root, account)
    return stripped, body, smsText, smsLength


def prepareMessage(
    raw: bytes,
    account: Account,
    recipients: Sequence[Recipient],
    *,
    senders: Sequence[Sender],
    hostname: str,
    now: datetime,
    envelopeSender: EnvelopeSender | None = None,
    smsDomains: Sequence[str] = (),
    notificationId: str | None = None,
    received: bytes = b"",
) -> PreparedMessage:
    """
    Apply the account's content rules to ``raw`` (the DATA as received, CRLF line endings,
    dot-stuffing undone) sent to ``recipients``, and return what to store.

    ``senders`` are the account's registered senders (the From: header must be one of them),
    ``smsDomains`` the configured SMS domains (to match To:/Cc: addresses), ``notificationId``
    the id the message will have (for the added Message-ID), ``received`` the ``Received:``
    field from :func:`mailrelay.message.received.receivedHeader`, put on top.

    Raises ``Refusal`` of kind SIZE_EXCEEDED over ``account.max_message_size``;
    BARE_LINE_ENDING for a bare CR or LF in the header; SENDER_NOT_ALLOWED for a From: address
    that is not the account's; CONTENT_REFUSED, with the reason, for everything else: a header
    or MIME structure that does not parse, a malformed ``X-IB-*`` option, the account's
    text-and-html, To:/Cc: and attachment rules, an SMS text that is missing or too long.
    Nothing else escapes.
    """
    checkSize(len(raw), account)
    blockBytes, bodyStart = _split(raw)
    if recipients and all(r.channel == "sms" for r in recipients) and _isBareText(blockBytes):
        return _prepareBareText(
            raw,
            account,
            hostname=hostname,
            now=now,
            notificationId=notificationId,
            received=received,
        )
    body: bytes | memoryview = memoryview(raw)[bodyStart:]
    header = _Header(blockBytes)
    options, removed, ignored = _options(header)
    removed += [field for field in header.fields if field.name in _REMOVED_FIELDS]

    hasSms = any(r.channel == "sms" for r in recipients)
    hasEmail = any(r.channel == "email" for r in recipients)
    fromMailbox = _checkFrom(header, account, senders, envelopeSender, hasEmail)
    if account.require_rcpt_headers:
        _checkRcptHeaders(header, recipients, smsDomains)

    contentType, boundary = _contentType(header)
    isMultipart = contentType.startswith("multipart/")
    if isMultipart:
        _checkRootStructure(raw, bodyStart, boundary)

    with _hostile("The MIME structure cannot be parsed"):
        stripped, newBody, smsText, smsLength = _structureRules(
            raw, header, account, isMultipart, hasSms
        )
    if newBody is not None:
        body = newBody

    added = []
    messageIds = header.named("message-id")
    messageId = ""
    if messageIds:
        messageId = header.value(messageIds[0]).strip(b" \t").decode("utf-8", "replace")
    if not messageId:
        removed += messageIds
        messageId = f"<{notificationId or secrets.token_hex(16)}@{hostname}>"
        added.append(b"Message-ID: " + messageId.encode("ascii", "replace") + b"\r\n")
    if not header.named("date"):
        added.append(b"Date: " + format_datetime(now).encode("ascii") + b"\r\n")

    pieces: tuple[bytes | memoryview, ...]
    if not (removed or added or stripped):
        pieces = (received, raw) if received else (raw,)
    else:
        block = header.without(removed)
        pieces = (received, block, b"\r\n" if block else b"", *added, b"\r\n", body)
    return PreparedMessage(
        pieces=tuple(piece for piece in pieces if piece),
        options=options,
        fromAddress=None if fromMailbox is None else str(fromMailbox),
        messageId=messageId,
        smsText=smsText,
        smsLength=smsLength,
        strippedAttachments=tuple(stripped),
        ignoredOptions=ignored,
    )
