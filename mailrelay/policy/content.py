"""
The end-of-DATA decision: the account's content rules applied to a message, and what must be
changed in it before it is stored (:mod:`mailrelay.message.intake` changes it).

Speed is the design: most messages need nothing but their header. The header block (up to the
first empty line) is split off and read field by field (:mod:`mailrelay.headerblock`); the
fields a rule needs (From:, To:/Cc:, a multipart Content-Type) are parsed by
``email.policy.SMTP``'s header classes, after a fast path for the common ``Name <addr@domain>``
forms. The whole MIME tree is parsed with ``BytesParser(policy=MIME_POLICY)``, once, only when a
rule needs the structure: "text and html" or attachments strip/refuse on a multipart message,
and the text of an SMS.

What is decided to change: the ``X-IB-*`` options and ``Bcc:`` are dropped (the envelope already
says who gets a blind copy; the header would tell everyone), a ``Message-ID:`` and a ``Date:``
are to be added when missing, attachments stripped when the account says so, and a bare SMS
text wrapped into a text/plain message.
"""

from __future__ import annotations

import email.errors
import functools
import operator
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
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
from itertools import islice
from types import TracebackType
from typing import NamedTuple, cast

from mailrelay.headerblock import HeaderField, fieldValue, headerFields, splitMessage
from mailrelay.model import Account, HeaderOptions, Recipient, Sender
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


MIME_POLICY = SMTP.clone(header_factory=_headerFactory)
"""``email.policy.SMTP`` with header objects remembered: the policy a message is parsed with
here, and in :mod:`mailrelay.message.intake` when it strips attachments."""
_BROKEN_STRUCTURE = (
    email.errors.NoBoundaryInMultipartDefect,
    email.errors.StartBoundaryNotFoundDefect,
    email.errors.MultipartInvariantViolationDefect,
    email.errors.InvalidMultipartContentTransferEncodingDefect,
)
_REMOVED_FIELDS = frozenset({"bcc"})
_byPlace = operator.attrgetter("start")


class ContentDecision(NamedTuple):
    """
    What :func:`checkContent` decided about a message it accepts: the values the rest of the
    intake needs, and the changes the message must get before it is stored, which
    :func:`mailrelay.message.intake.rewriteMessage` makes. (A named tuple rather than a
    frozen dataclass: it is made for every message, and is made three times faster.)
    """

    options: HeaderOptions
    fromAddress: str | None
    """The From: header's (first) address in normal form; None when there is no From:."""
    messageId: str | None
    """The client's ``Message-ID``; None when it has none (or an empty one): one is added."""
    smsText: str | None = None
    """The text to send to the SMS recipients; None when there are none."""
    smsLength: SmsLength | None = None
    ignoredOptions: tuple[str, ...] = ()
    """``X-IB-*`` header names mailrelay does not know: removed, otherwise ignored."""
    dropFields: tuple[HeaderField, ...] = ()
    """Header fields to remove (``X-IB-*`` options, ``Bcc:``, an empty ``Message-ID:``), as
    found in the message's header block (:func:`mailrelay.headerblock.splitMessage`)."""
    addDate: bool = False
    """Whether the message has no ``Date:``, so one is added."""
    stripAttachments: bool = False
    """Whether the message has attachments that the account's ``strip`` rule removes."""
    bareText: bool = False
    """Whether the DATA is an SMS text without a header, to be wrapped into a text/plain
    message whose body is the text as sent."""


def _refuse(reason: str) -> Refusal:
    return Refusal(RefusalKind.CONTENT_REFUSED, reason)


class _hostile:  # noqa: N801 (used as a function: `with _hostile(reason):`)
    """
    Turn an exception from the ``email`` package into a refusal giving ``reason``: its parsers
    have crashed on hostile input before (IndexError, AttributeError, LookupError...), and
    such a message must be refused for good, not answered with a temporary failure that makes
    the client retry it forever. A class, not a generator made a context manager: it is on
    every message's path, where the generator's machinery cost ten times as much.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None or issubclass(kind, Refusal) or not issubclass(kind, Exception):
            return  # nothing, or what is raised already goes on
        raise _refuse(self.reason) from None


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


class _Header:
    """
    The header block, checked field by field (:func:`mailrelay.headerblock.headerFields`).
    Values are parsed by the ``email`` package's header classes only when a rule asks for them.
    """

    def __init__(self, block: bytes) -> None:
        # The block from splitMessage ends with the CRLF of its last line (when it has one):
        # the limit is on the header's text without it.
        size = len(block) - 2 if block.endswith(b"\r\n") else len(block)
        if size > MAX_HEADER_BLOCK:
            raise _refuse(f"The header is larger than {MAX_HEADER_BLOCK // 1024} KiB")
        self.block = block
        lineEndings = block.count(b"\r\n")
        if block.count(b"\r") > lineEndings or block.count(b"\n") > lineEndings:
            raise Refusal(RefusalKind.BARE_LINE_ENDING)  # a CR or LF not part of a CRLF
        if b"\x00" in block:
            raise _refuse("The header contains a NUL character")
        self.fields = headerFields(block)
        # Several rules look up fields by name on every message: one pass, which also finds
        # the lines that are not fields.
        self._byName: dict[str, list[HeaderField]] = {}
        for field in self.fields:
            if not field.name:
                self._refuseLine(field)
            same = self._byName.get(field.name)
            if same is None:
                self._byName[field.name] = [field]
            else:
                same.append(field)

    def _refuseLine(self, field: HeaderField) -> None:
        if field.start == 0 and self.block[:1] in (b" ", b"\t"):
            raise _refuse("The header starts with a continuation line")
        line = self.block.count(b"\r\n", 0, field.start) + 1
        raise _refuse(
            f"Line {line} of the header is not a header field (Name: value); "
            "is the empty line between header and body missing?"
        )

    def named(self, name: str) -> list[HeaderField]:
        return self._byName.get(name, [])

    def value(self, field: HeaderField) -> bytes:
        """The field's value, unfolded (RFC 5322 §2.2.3: the CRLFs removed), leading blanks
        gone, 8-bit kept."""
        return fieldValue(self.block, field)

    def text(self, field: HeaderField) -> str:
        """The value as the ``email`` package reads it."""
        return self.value(field).decode("utf-8", "surrogateescape")

    def parsed(self, field: HeaderField) -> BaseHeader:
        """The field parsed by ``email.policy.SMTP``'s header classes."""
        with _hostile(f"The {field.name.title()}: header cannot be parsed"):
            return _headerFactory(field.name, self.text(field))

    @functools.cached_property
    def message(self) -> Message:
        """The whole header as an ``email`` message without body, for the rarer rules."""
        block = self.block if self.block.endswith(b"\r\n") else self.block + b"\r\n"
        with _hostile("The header cannot be parsed"):
            return BytesHeaderParser(policy=MIME_POLICY).parsebytes(block + b"\r\n")


def _options(header: _Header) -> tuple[HeaderOptions, list[HeaderField], tuple[str, ...]]:
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
    senders: Iterable[Sender],
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
class MimePart:
    """One MIME part with what the rules ask of it, its headers parsed once (whether it is
    an attachment is the attachment rules' to say, and the stripping's)."""

    message: Message
    contentType: str
    filename: str | None
    isAttachment: bool

    @classmethod
    def of(cls, part: Message) -> MimePart:
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


class MimeTree:
    """The MIME tree, parsed on first use (the one full parse a message gets, unless its
    attachments are stripped); the parse refused as :class:`Refusal` when it fails or finds
    a broken structure."""

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
                self._root = BytesParser(policy=MIME_POLICY).parsebytes(self._raw)
                defects = [d for part in self._root.walk() for d in part.defects]
            for defect in defects:
                if isinstance(defect, _BROKEN_STRUCTURE):
                    raise _refuse(f"The MIME structure is broken: {defect.__doc__ or defect}")
        return self._root


def _leaves(message: Message) -> Iterator[MimePart]:
    """Every leaf of the tree, and every attachment (which is not entered)."""
    part = MimePart.of(message)
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
    The SMS text of a message as stored (what :func:`checkContent` measured when it accepted
    it: the first text/plain part); for the delivery side. Raises ValueError when the message
    has none or cannot be read.
    """
    try:
        text = _plainText(MimeTree(message).root)
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


def _checkBareText(raw: bytes, account: Account) -> ContentDecision:
    """A header-less DATA section: its text, to be wrapped into a text/plain message."""
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
    return ContentDecision(
        options=HeaderOptions(),
        fromAddress=None,
        messageId=None,
        smsText=text,
        smsLength=length,
        addDate=True,
        bareText=True,
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
) -> tuple[bool, str | None, SmsLength | None]:
    """
    The rules that need the MIME structure, sharing one parse: text-and-html, attachments,
    SMS text. Returns whether attachments are to be stripped, and the SMS text and its
    measure when there are SMS recipients.
    """
    tree = MimeTree(raw)
    if account.require_alternative:
        if not isMultipart:
            raise _refuse(
                "This account requires both a text/plain and a text/html part "
                "(multipart/alternative); the message has only one part"
            )
        _checkAlternative(tree.root)
    strip = False
    if account.attachments != "allow":
        if not isMultipart:
            part = MimePart.of(header.message)
            if part.isAttachment:
                raise _refuse(f"The message is only an attachment ({part.description})")
        attachments = []
        if isMultipart:
            attachments = [p.description for p in _leaves(tree.root) if p.isAttachment]
        if attachments and account.attachments == "refuse":
            raise _refuse(f"This account does not accept attachments (found {attachments[0]})")
        strip = bool(attachments)
    if not hasSms:
        return strip, None, None
    smsText, smsLength = _smsText(tree.root, account)
    return strip, smsText, smsLength


def checkContent(
    raw: bytes,
    account: Account,
    recipients: Sequence[Recipient],
    *,
    senders: Iterable[Sender],
    envelopeSender: EnvelopeSender | None = None,
    smsDomains: Sequence[str] = (),
) -> ContentDecision:
    """
    Apply the account's content rules to ``raw`` (the DATA as received, CRLF line endings,
    dot-stuffing undone) sent to ``recipients``, and return what was decided: the values the
    intake needs and the changes the message must get
    (:func:`mailrelay.message.intake.rewriteMessage` makes them).

    ``senders`` are the account's registered senders (the From: header must be one of them;
    a session passes its :class:`~mailrelay.policy.senders.RegisteredSenders`),
    ``smsDomains`` the configured SMS domains (to match To:/Cc: addresses).

    Raises ``Refusal`` of kind SIZE_EXCEEDED over ``account.max_message_size``;
    BARE_LINE_ENDING for a bare CR or LF in the header; SENDER_NOT_ALLOWED for a From: address
    that is not the account's; CONTENT_REFUSED, with the reason, for everything else: a header
    or MIME structure that does not parse, a malformed ``X-IB-*`` option, the account's
    text-and-html, To:/Cc: and attachment rules, an SMS text that is missing or too long.
    Nothing else escapes.
    """
    checkSize(len(raw), account)
    blockBytes, bodyStart = splitMessage(raw)
    if recipients and all(r.channel == "sms" for r in recipients) and _isBareText(blockBytes):
        return _checkBareText(raw, account)
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
        strip, smsText, smsLength = _structureRules(raw, header, account, isMultipart, hasSms)

    messageIds = header.named("message-id")
    messageId = ""
    if messageIds:
        messageId = header.value(messageIds[0]).strip(b" \t").decode("utf-8", "replace")
    if not messageId:
        removed += messageIds
    return ContentDecision(
        options=options,
        fromAddress=None if fromMailbox is None else str(fromMailbox),
        messageId=messageId or None,
        smsText=smsText,
        smsLength=smsLength,
        ignoredOptions=ignored,
        dropFields=tuple(sorted(removed, key=_byPlace)) if removed else (),
        addDate=not header.named("date"),
        stripAttachments=strip,
    )
