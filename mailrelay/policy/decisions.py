"""
What policy says when it says no: a :class:`Refusal` with a :class:`RefusalKind` and a reason.

Policy decides; it does not speak a protocol. The edges translate a refusal: the SMTP intake
into a reply (:mod:`mailrelay.smtp.refusals`, the one table of codes), an HTTP resource into a
status. The kind is what an edge translates; the reason is the text for the customer, which an
edge passes on as it is (None: the edge's own wording for the kind).
"""

from __future__ import annotations

import enum


class RefusalKind(enum.Enum):
    """Why something was refused; each edge has one answer per kind."""

    BAD_SENDER_SYNTAX = "bad-sender-syntax"
    """The envelope sender is not an address or SMS sender id."""
    SENDER_NOT_ALLOWED = "sender-not-allowed"
    """The sender (envelope or From:) is not registered to the account."""
    BAD_RECIPIENT_SYNTAX = "bad-recipient-syntax"
    """The recipient is not an address or phone number."""
    NO_SUCH_RECIPIENT = "no-such-recipient"
    """The recipient is well formed but the account may not send there."""
    TOO_MANY_RECIPIENTS = "too-many-recipients"
    """The message has as many recipients as it may have."""
    SIZE_EXCEEDED = "size-exceeded"
    """The message is larger than the account (or the configuration) allows."""
    BARE_LINE_ENDING = "bare-line-ending"
    """The message has a CR or LF that is not part of a CRLF."""
    CONTENT_REFUSED = "content-refused"
    """The message breaks a content rule (header, MIME structure, account rules, SMS text)."""
    RATE_LIMITED = "rate-limited"
    """The account sends faster than its rate: temporary."""
    QUOTA_EXCEEDED = "quota-exceeded"
    """The account's daily quota is used up: temporary, until midnight UTC."""
    CREDITS_EXHAUSTED = "credits-exhausted"
    """The account's prepaid SMS credits do not cover the message."""
    LOGIN_WITHDRAWN = "login-withdrawn"
    """The login a session was opened with no longer holds (account, key or network changed)."""


class Refusal(Exception):
    """
    Raised by a policy function (or returned through a Deferred's failure) to refuse: ``kind``
    says why, for the edge to answer in its protocol; ``reason`` is the human-readable text,
    or None when the kind says it all.
    """

    def __init__(self, kind: RefusalKind, reason: str | None = None) -> None:
        super().__init__(kind.value if reason is None else f"{kind.value}: {reason}")
        self.kind = kind
        self.reason = reason
