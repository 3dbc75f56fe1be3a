"""
The SMTP answer to each policy refusal: the one place where a :class:`RefusalKind` gets its
reply code and enhanced code (SPEC §4's table).
"""

from __future__ import annotations

from types import MappingProxyType

from mailrelay.policy.decisions import Refusal, RefusalKind
from mailrelay.smtp import replies
from mailrelay.smtp.replies import Reply

REPLIES = MappingProxyType(
    {
        RefusalKind.BAD_SENDER_SYNTAX: replies.BAD_SENDER_SYNTAX,
        RefusalKind.SENDER_NOT_ALLOWED: replies.SENDER_NOT_ALLOWED,
        RefusalKind.BAD_RECIPIENT_SYNTAX: replies.BAD_RECIPIENT_SYNTAX,
        RefusalKind.NO_SUCH_RECIPIENT: replies.NO_SUCH_RECIPIENT,
        RefusalKind.TOO_MANY_RECIPIENTS: replies.TOO_MANY_RECIPIENTS,
        RefusalKind.SIZE_EXCEEDED: replies.MESSAGE_TOO_BIG,
        RefusalKind.BARE_LINE_ENDING: replies.BARE_LINE_ENDING,
        RefusalKind.CONTENT_REFUSED: replies.CONTENT_REFUSED,
        RefusalKind.RATE_LIMITED: replies.RATE_EXCEEDED,
        RefusalKind.QUOTA_EXCEEDED: replies.QUOTA_EXCEEDED,
        RefusalKind.CREDITS_EXHAUSTED: replies.SMS_CREDITS_EXHAUSTED,
        RefusalKind.LOGIN_WITHDRAWN: replies.LOGIN_WITHDRAWN,
    }
)
"""Every refusal kind's reply; its text is used when the refusal gives no reason."""


def replyFor(refusal: Refusal) -> Reply:
    """The reply that answers ``refusal``: its kind's codes, with its reason as the text."""
    reply = REPLIES[refusal.kind]
    return reply if refusal.reason is None else reply.withText(refusal.reason)
