"""
Values that flow along the data path: accounts, senders, envelopes, notifications, status events.

Everything here is immutable; the store hands these out and takes them back, the policy
functions read them, and nothing mutates one in place (use ``dataclasses.replace``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

Channel = Literal["email", "sms"]
AttachmentPolicy = Literal["allow", "strip", "refuse"]
SenderKind = Literal["domain", "address", "sms"]
MessageText = bytes | tuple[bytes | memoryview, ...]
"""A message's bytes to store: whole, or as pieces that follow one another (a new header
block, then a view of the body as it arrived), so that a store that writes them one after
another never joins them; :func:`joinText` for one that needs them whole."""


def textPieces(text: MessageText) -> tuple[bytes | memoryview, ...]:
    """``text`` as pieces: itself if it is in pieces, else one piece."""
    return text if isinstance(text, tuple) else (bytes(text),)


def joinText(text: MessageText) -> bytes:
    """The bytes of ``text``, joined if it is in pieces."""
    return b"".join(text) if isinstance(text, tuple) else bytes(text)


API_KEY_USER = "App"
"""The SMTP / HTTP user name that means "the password is an API key"."""


@dataclass(frozen=True)
class Account:
    """A customer. ``name`` is the accountId and the SMTP user name."""

    name: str
    password_hash: str = field(repr=False)
    enabled: bool = True
    sms_enabled: bool = False
    sms_segments: int = 1
    rate_per_second: float | None = None
    daily_quota: int | None = None
    networks: tuple[str, ...] = ()
    require_alternative: bool = False
    require_rcpt_headers: bool = False
    attachments: AttachmentPolicy = "allow"
    max_message_size: int | None = None
    max_recipients: int | None = None
    bounces: bool = True  # delivery status notifications to the envelope sender on failure
    sms_credits: int | None = None  # prepaid SMS segments left; None: no prepaid limit


@dataclass(frozen=True)
class ApiKey:
    """An API key's public half; the key itself is never stored, only its SHA-256."""

    key_id: str
    account: str
    created_at: datetime


@dataclass(frozen=True)
class Sender:
    """A domain, an address or an SMS sender id registered to an account."""

    account: str
    value: str
    kind: SenderKind


@dataclass(frozen=True)
class Recipient:
    """
    One RCPT, classified: ``address`` is a normalised e-mail address (channel ``email``)
    or an E.164 number such as ``+4477331234567`` (channel ``sms``).
    """

    address: str
    channel: Channel

    @property
    def key(self) -> str:
        """The form the status API uses: ``email:<addr>`` or ``sms:<E.164>``."""
        return f"{self.channel}:{self.address}"


@dataclass(frozen=True)
class HeaderOptions:
    """The ``X-IB-*`` header options a customer may set on a message (SPEC §5)."""

    bulk_id: str | None = None
    notify_url: str | None = None
    notify_content_type: str = "application/json"
    callback_data: str | None = None
    intermediate_report: bool = False
    tracking_url: str | None = None


@dataclass(frozen=True)
class Notification:
    """One accepted message and all of its recipients."""

    notification_id: str
    account: str
    sender: str
    recipients: tuple[Recipient, ...]
    size: int
    received_at: datetime
    options: HeaderOptions = HeaderOptions()
    client_address: str = ""
    helo: str = ""


STATUS_TEXTS = {
    "CAAS_RECEIVED": "Successful",
    "CAAS_SENT": "Successful",
    "CH_RECEIVED": "Successful",
    "CH_SENT": "Successful",
    "CH_DEFERRED": "Deferred",
    "CH_FAILED": "Failed",
    "CAAS_FAILED": "Failed",
    "OPENED": "Opened",  # open and click tracking (SPEC §8.5): statusText is the link clicked
    "CLICKED": "Clicked",
}


@dataclass(frozen=True)
class StatusEvent:
    """One step of one recipient's trail."""

    notification_id: str
    recipient: Recipient
    status_code: str
    status_text: str
    timestamp: datetime


@dataclass(frozen=True)
class SessionInfo:
    """What the avatar may know about the SMTP connection a command arrived on."""

    client_address: str
    listener: str
    helo: str = ""
    tls_version: str | None = None
    authenticated: bool = False


@dataclass(frozen=True)
class QueueStats:
    queued: int
    deferred: int
    in_flight: int
    held: int = 0


QueueState = Literal["queued", "deferred", "in_flight", "held"]
"""Where a notification with recipients still to deliver stands: due when its time comes
(``queued``: never tried; ``deferred``: tried, failed for now), leased by a delivery worker
(``in_flight``), or kept aside by an operator (``held``: never claimed until released)."""


@dataclass(frozen=True)
class Delivery:
    """
    A notification claimed for delivery (SPEC §8.1): its message, the recipients that have no
    final outcome yet, and the lease that makes the claim this worker's alone. Every write
    about it (:meth:`~mailrelay.interfaces.IDeliveryQueue.recordOutcome`, ``renewLease``,
    ``releaseLease``) names ``lease``; once another worker has claimed it, they fail with
    ``LeaseLost`` and write nothing.
    """

    notification: Notification
    message: bytes = field(repr=False)
    pending: tuple[Recipient, ...]
    attempts: int  # claims so far, this one included
    lease: str


@dataclass(frozen=True)
class QueueItem:
    """One entry of the queue as an operator lists it (``mailrelay queue list``)."""

    notification_id: str
    account: str
    sender: str
    state: QueueState
    next_attempt: datetime  # in_flight: when the lease ends
    attempts: int
    pending: tuple[Recipient, ...]
    received_at: datetime
    size: int


DkimAlgorithm = Literal["rsa", "ed25519"]


@dataclass(frozen=True)
class DkimKey:
    """A sender domain's DKIM signing key. ``private_key`` is PEM (PKCS#8); never shown."""

    domain: str
    selector: str
    algorithm: DkimAlgorithm
    private_key: bytes = field(repr=False)
    created_at: datetime


def utcnow() -> datetime:
    """The current time, timezone-aware UTC. Prefer an injected clock where there is one."""
    return datetime.now(UTC)


def fromTimestamp(seconds: float) -> datetime:
    """A timezone-aware UTC datetime from a POSIX timestamp (e.g. ``clock.seconds()``)."""
    return datetime.fromtimestamp(seconds, UTC)


ReportKind = Literal["delivery", "tracking"]


@dataclass(frozen=True)
class PendingReport:
    """
    One report waiting in the outbox to be POSTed to a customer's URL (SPEC §8.4, §8.5):
    ``result`` is the JSON text of one entry of the document's ``results`` list, ``report_id``
    a unique id; ``content_type`` says whether the document goes as JSON or XML.
    """

    report_id: str
    notification_id: str
    account: str
    url: str
    content_type: str
    kind: ReportKind
    result: str
    created_at: datetime


@dataclass(frozen=True)
class ClaimedReport:
    """A report claimed for sending under ``lease``; ``attempts`` made before this one."""

    report: PendingReport
    attempts: int
    lease: str


@dataclass(frozen=True)
class ReportAttempt:
    """One POST of a report as ``mailrelay reports list`` shows it: the URL's host, the
    answer's status code (0: no answer) and what became of it."""

    notification_id: str
    report_id: str
    host: str
    code: int
    outcome: str  # "sent", "retry", "dropped", "gone", "refused"
    at: datetime


FirstAttempt = Callable[[Delivery], tuple[tuple[StatusEvent, ...], tuple[PendingReport, ...]]]
"""What a claim writes, in its own transaction, for a notification claimed for its first attempt:
the status events that say the attempt started (``CAAS_SENT``) and the reports they make
(:meth:`~mailrelay.interfaces.IDeliveryQueue.claimDue`). A store may call it on the thread it
writes on, inside its transaction: it only computes."""
