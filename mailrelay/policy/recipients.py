"""
What a RCPT names and whether the account may send there: an e-mail address (channel ``email``)
or a phone number (channel ``sms``), and how many recipients one message may have.
"""

from __future__ import annotations

from collections.abc import Iterable

from mailrelay.model import Account, Recipient
from mailrelay.netaddress import isPublicAddress
from mailrelay.policy.addresses import literalAddress, recipientAddress
from mailrelay.policy.decisions import Refusal, RefusalKind
from mailrelay.policy.phones import phoneRecipient
from mailrelay.policy.senders import EnvelopeSender


def classifyRecipient(
    text: str,
    account: Account,
    smsDomains: Iterable[str] = (),
    *,
    sender: EnvelopeSender | None = None,
    smtputf8: bool = False,
) -> Recipient:
    """
    The recipient ``text`` (a RCPT path's address) names, with its channel: a phone number, bare
    or at one of ``smsDomains``, becomes ``Recipient(<E.164>, "sms")``; anything else must be an
    e-mail address and becomes ``Recipient(<normal form>, "email")``.

    Raises ``Refusal(BAD_RECIPIENT_SYNTAX)`` when the syntax is wrong,
    ``Refusal(NO_SUCH_RECIPIENT)`` for a phone number on an account without SMS, for a
    postmaster without a domain, for an address literal inside a network, and for an e-mail
    address when the envelope sender is an SMS sender id (which no mail server would accept as
    a return path).
    """
    number = phoneRecipient(text, smsDomains)
    if number is not None:
        if not account.sms_enabled:
            raise Refusal(
                RefusalKind.NO_SUCH_RECIPIENT,
                f"{number} is a phone number and account {account.name} has no SMS channel",
            )
        return Recipient(number, "sms")
    if text.lower() == "postmaster":
        raise Refusal(
            RefusalKind.NO_SUCH_RECIPIENT,
            "This relay has no local postmaster; give a full address",
        )
    mailbox = recipientAddress(text, smtputf8=smtputf8)
    if mailbox.domain.startswith("[") and not _isPublicLiteral(mailbox.domain):
        raise Refusal(
            RefusalKind.NO_SUCH_RECIPIENT,
            f"{mailbox}: mail to a loopback, private or reserved address is not relayed",
        )
    if sender is not None and sender.kind == "sms":
        raise Refusal(
            RefusalKind.NO_SUCH_RECIPIENT,
            f"{mailbox}: the SMS sender id {sender.value} can only send to phone numbers",
        )
    return Recipient(str(mailbox), "email")


def _isPublicLiteral(literal: str) -> bool:
    """Whether an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``, as checked by
    :func:`recipientAddress`) is a globally routable address: delivery to one inside this
    network (loopback, private, link-local, reserved) would let a client reach hosts that
    only the relay can."""
    try:
        address = literalAddress(literal)
    except ValueError:
        return False
    return isPublicAddress(address)


def recipientLimit(account: Account, configLimit: int) -> int:
    """The most recipients one message of ``account`` may have (``limits.max_recipients``)."""
    if account.max_recipients is None:
        return configLimit
    return min(configLimit, account.max_recipients)


def checkRecipientCount(accepted: int, account: Account, configLimit: int) -> None:
    """
    Whether one more RCPT may be accepted after ``accepted`` ones: the one check of the
    recipient limit (:func:`recipientLimit`). Raises ``Refusal(TOO_MANY_RECIPIENTS)`` when the
    limit is reached; the reason names the number only when it is the account's own, lower
    limit (the relay's limit is answered in the edge's own words, as it always was).
    """
    limit = recipientLimit(account, configLimit)
    if accepted < limit:
        return
    if limit == configLimit:
        raise Refusal(RefusalKind.TOO_MANY_RECIPIENTS)
    raise Refusal(
        RefusalKind.TOO_MANY_RECIPIENTS,
        f"Too many recipients: at most {limit} per message; send the rest in another",
    )
