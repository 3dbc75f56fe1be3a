"""
Who may send for an account: the envelope sender at MAIL, the From: header at end of data.

An e-mail sender is allowed when it is one of the account's registered addresses (local part
exact, domain compared in normal form, so case-insensitively and IDN-aware) or when its domain
is exactly one of the account's registered domains. Subdomains do not count: registering
``example.com`` does not allow ``news.example.com``, which may be run by someone else; register
it too. The null sender ``<>`` is refused: a customer's messages must name who sent them.

An SMS sender id (SPEC §5) is digits, optionally after ``+``, at most 16, or letters and digits,
at most 11, with at least one letter. A numeric id that is a phone number is compared in E.164
(so ``+393331234567``, ``00393331234567`` and ``393331234567`` are one id); a short code and an
alphanumeric id are compared exactly as written, because that is what the handset shows.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from mailrelay.model import Account, Sender
from mailrelay.policy.addresses import (
    AddressSyntaxError,
    Mailbox,
    normaliseDomain,
    parseMailbox,
    senderAddress,
)
from mailrelay.policy.decisions import Refusal, RefusalKind
from mailrelay.policy.phones import PhoneNumberError, normalisePhoneNumber

MAX_NUMERIC_SENDER_ID = 16
MAX_ALPHANUMERIC_SENDER_ID = 11
_NUMERIC_ID = re.compile(rf"\+?[0-9]{{1,{MAX_NUMERIC_SENDER_ID}}}")
_ALPHANUMERIC_ID = re.compile(rf"[A-Za-z0-9]{{1,{MAX_ALPHANUMERIC_SENDER_ID}}}")


class SenderIdError(ValueError):
    """Text that is not an SMS sender id."""


@dataclass(frozen=True)
class EnvelopeSender:
    """The accepted MAIL FROM: a normalised address, or an SMS sender id."""

    value: str
    kind: Literal["address", "sms"]


def normaliseSenderId(text: str) -> str:
    """The normal form of an SMS sender id (see the module docstring); raises SenderIdError."""
    if _NUMERIC_ID.fullmatch(text):
        try:
            return normalisePhoneNumber(text)
        except PhoneNumberError:
            return text
    if _ALPHANUMERIC_ID.fullmatch(text) and not text.isdigit():
        return text
    raise SenderIdError(
        f"{text!r} is not an SMS sender id (up to {MAX_NUMERIC_SENDER_ID} digits, optionally "
        f"after +, or up to {MAX_ALPHANUMERIC_SENDER_ID} letters and digits)"
    )


@dataclass(frozen=True, eq=False)
class RegisteredSenders:
    """
    An account's registered senders, read once into what a lookup needs: its addresses in
    normal form, its domains and its SMS sender ids. A session makes it when it first needs
    the senders and keeps it for its messages; any other iterable of :class:`Sender` passed
    instead is read again on each call. Iterates over the senders it was made of.
    """

    account: str
    senders: tuple[Sender, ...]
    addresses: frozenset[Mailbox]
    domains: frozenset[str]
    smsIds: frozenset[str]

    @classmethod
    def of(cls, account: str, senders: Iterable[Sender]) -> RegisteredSenders:
        """The senders of ``account`` among ``senders``; a value that cannot be read (the
        registration validates) allows nothing."""
        senders = tuple(senders)
        addresses, domains, smsIds = set(), set(), set()
        for sender in senders:
            if sender.account != account:
                continue
            try:
                if sender.kind == "address":
                    addresses.add(parseMailbox(sender.value))
                elif sender.kind == "domain":
                    domains.add(normaliseDomain(sender.value))
                else:
                    smsIds.add(normaliseSenderId(sender.value))
            except (AddressSyntaxError, SenderIdError):
                continue
        return cls(account, senders, frozenset(addresses), frozenset(domains), frozenset(smsIds))

    def __iter__(self) -> Iterator[Sender]:
        return iter(self.senders)


def _registryOf(account: Account, senders: Iterable[Sender]) -> RegisteredSenders:
    if isinstance(senders, RegisteredSenders) and senders.account == account.name:
        return senders
    return RegisteredSenders.of(account.name, senders)


def isRegisteredMailbox(mailbox: Mailbox, account: Account, senders: Iterable[Sender]) -> bool:
    """Whether ``mailbox`` is a registered address or in a registered domain of ``account``."""
    registry = _registryOf(account, senders)
    return mailbox in registry.addresses or mailbox.domain in registry.domains


def _notRegistered(what: str, account: Account) -> Refusal:
    return Refusal(
        RefusalKind.SENDER_NOT_ALLOWED,
        f"{what} is not registered to account {account.name}; "
        "register the address or its domain first",
    )


def checkEnvelopeSender(
    text: str, account: Account, senders: Iterable[Sender], *, smtputf8: bool = False
) -> EnvelopeSender:
    """
    The MAIL FROM address (``text``: the path's address, without brackets) once it is
    known to be the account's: an e-mail address in normal form, or an SMS sender id.

    Raises ``Refusal(BAD_SENDER_SYNTAX)`` for an address or sender id that is not well
    formed, ``Refusal(SENDER_NOT_ALLOWED)`` for one that is not registered, for the null
    sender, and for a sender id on an account without SMS.
    """
    if not text:
        raise Refusal(
            RefusalKind.SENDER_NOT_ALLOWED,
            "The null sender <> cannot be used; use a registered address",
        )
    if "@" in text:
        mailbox = senderAddress(text, smtputf8=smtputf8)
        if not isRegisteredMailbox(mailbox, account, senders):
            raise _notRegistered(f"Sender {mailbox}", account)
        return EnvelopeSender(str(mailbox), "address")
    try:
        senderId = normaliseSenderId(text)
    except SenderIdError as e:
        raise Refusal(RefusalKind.BAD_SENDER_SYNTAX, f"Sender invalid: {e}") from None
    if not account.sms_enabled:
        raise Refusal(
            RefusalKind.SENDER_NOT_ALLOWED,
            f"Sender id {senderId} needs SMS, which account {account.name} does not have",
        )
    if senderId not in _registryOf(account, senders).smsIds:
        raise _notRegistered(f"SMS sender id {senderId}", account)
    return EnvelopeSender(senderId, "sms")


def checkHeaderSenders(
    mailboxes: Sequence[Mailbox], account: Account, senders: Iterable[Sender]
) -> None:
    """
    Refuse, with ``Refusal(SENDER_NOT_ALLOWED)`` naming it, the first From: header address
    that is not the account's.
    """
    for mailbox in mailboxes:
        if not isRegisteredMailbox(mailbox, account, senders):
            raise _notRegistered(f"The From: header address {mailbox}", account)
