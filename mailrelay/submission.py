"""
The account's avatar (:class:`~mailrelay.interfaces.ISubmission`): decides MAIL, RCPT and the
end of DATA, and queues what it accepts.

The decisions are the pure functions of :mod:`mailrelay.policy`; this module fetches what they
need from the store, calls them at the right moment, has :mod:`mailrelay.message` rewrite an
accepted message as policy decided, and turns it into a durably queued notification. Nothing
is stored before the end of DATA, and nothing refused is stored at all. A refusal is a
:class:`~mailrelay.policy.decisions.Refusal`; the protocol answers it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.config import Config
from mailrelay.interfaces import InsufficientCredits, IStore, ISubmission
from mailrelay.message.intake import rewriteMessage
from mailrelay.message.received import receivedHeader
from mailrelay.model import (
    Account,
    MessageText,
    Notification,
    Recipient,
    SessionInfo,
    fromTimestamp,
)
from mailrelay.policy.content import checkContent, checkSize
from mailrelay.policy.decisions import Refusal, RefusalKind
from mailrelay.policy.limits import RateLimiter, checkDailyQuota, startOfDay
from mailrelay.policy.recipients import checkRecipientCount, classifyRecipient
from mailrelay.policy.senders import EnvelopeSender, RegisteredSenders, checkEnvelopeSender
from mailrelay.policy.sms import SmsLength


def _nothing() -> None:
    pass


def smsCost(account: Account, recipients: Sequence[Recipient], length: SmsLength | None) -> int:
    """The prepaid SMS credits a message costs (SPEC §8.3): one per segment per SMS
    recipient; 0 for an account without a prepaid limit."""
    if account.sms_credits is None or length is None:
        return 0
    return length.segments * sum(1 for r in recipients if r.channel == "sms")


def _admitted() -> None:
    return None


def _creditsRefused(failure: Failure, credits: int) -> Failure:
    if failure.check(InsufficientCredits):
        raise Refusal(
            RefusalKind.CREDITS_EXHAUSTED,
            f"SMS credits do not cover this message ({credits} needed)",
        )
    return failure


class Submissions:
    """What every avatar shares (store, config, clock, rate limiter); makes one per login."""

    def __init__(self, store: IStore, config: Config, clock: Any) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        # Each worker process keeps its own buckets, so each allows its share of the rate.
        self.rateLimiter = RateLimiter(clock.seconds, share=1 / config.processCount)
        # Messages of accounts with a daily quota being stored now, by account.
        self.storing: Counter[str] = Counter()
        self.stored: Callable[[], None] = _nothing
        """Called after each message is stored: the delivery loop's wake-up, when it runs in
        this process."""
        self.admit: Callable[[], Deferred[None] | None] = _admitted
        """Called at each MAIL before anything else: None to go on, or a Deferred to wait
        for (the delivery loop's flow control, :mod:`mailrelay.delivery.inflow`)."""

    def __call__(
        self, account: Account, recheck: Callable[[], Deferred[Account]] | None = None
    ) -> AccountSubmission:
        return AccountSubmission(account, self, recheck)


LOGIN_RECHECK_SECONDS = 1.0
"""How often (at most) an open session asks whether its login still holds: the store
remembers account data for as long (ACCOUNT_CACHE_SECONDS), so asking more often finds
nothing new."""


@implementer(ISubmission)
class AccountSubmission:
    """
    One session's avatar. ``recheck`` (from the realm) says whether the login that made it
    still holds, with the account as it is now: at a MAIL at least ``LOGIN_RECHECK_SECONDS``
    after the last answer it is asked again, so that an account disabled, an API key revoked
    or a client network removed ends the sessions open on it (421, then close) instead of
    leaving them to send on for as long as they stay connected, and changed limits count.
    """

    def __init__(
        self,
        account: Account,
        shared: Submissions,
        recheck: Callable[[], Deferred[Account]] | None = None,
    ) -> None:
        self.account = account
        self._shared = shared
        self._recheck = recheck
        self._checkedAt = shared.clock.seconds()
        # Fetched at the first MAIL of a session and kept for its life: a sender registered
        # while a client stays connected counts from its next connection.
        self._senders: RegisteredSenders | None = None

    def validateFrom(
        self, session: SessionInfo, sender: str, smtputf8: bool = False, size: int | None = None
    ) -> Any:
        """MAIL: whether the login still holds (now and then), the declared size against the
        account's limit, the account's rate and quota, then the sender. Returns the
        EnvelopeSender at once when nothing needs the store (the common case), else a Deferred
        firing with it; a refusal is raised, or fails the Deferred, as Refusal."""
        waiting = self._shared.admit()
        if waiting is not None:
            return waiting.addCallback(lambda _: self._validateFromNow(sender, smtputf8, size))
        return self._validateFromNow(sender, smtputf8, size)

    def _validateFromNow(self, sender: str, smtputf8: bool, size: int | None) -> Any:
        now = self._shared.clock.seconds()
        if self._recheck is not None and now - self._checkedAt >= LOGIN_RECHECK_SECONDS:
            d = self._recheck()
            d.addCallback(self._rechecked, now)
            d.addCallback(lambda _: self._validateFrom(sender, smtputf8, size))
            return d
        return self._validateFrom(sender, smtputf8, size)

    def _rechecked(self, account: Account, when: float) -> None:
        self.account = account
        self._checkedAt = when

    def _validateFrom(self, sender: str, smtputf8: bool, size: int | None) -> Any:
        account = self.account
        if size is not None:
            checkSize(size, account)
        self._shared.rateLimiter.check(account)
        if account.daily_quota is None and self._senders is not None:
            return checkEnvelopeSender(sender, account, self._senders, smtputf8=smtputf8)
        return self._validateFromStore(sender, smtputf8)

    @inlineCallbacks
    def _validateFromStore(self, sender: str, smtputf8: bool) -> Any:
        account, store = self.account, self._shared.store
        if account.daily_quota is not None:
            now = fromTimestamp(self._shared.clock.seconds())
            acceptedToday = yield store.acceptedSince(account.name, startOfDay(now))
            checkDailyQuota(account, acceptedToday)
        if self._senders is None:
            senders = yield store.listSenders(account.name)
            self._senders = RegisteredSenders.of(account.name, senders)
        return checkEnvelopeSender(sender, account, self._senders, smtputf8=smtputf8)

    def validateTo(
        self,
        session: SessionInfo,
        sender: EnvelopeSender,
        recipient: str,
        accepted: Sequence[Recipient],
        smtputf8: bool = False,
    ) -> Recipient:
        """RCPT: the recipient limit (the relay's and the account's: this is the one check of
        it), then the address and its channel. Returns the Recipient at once; raises
        Refusal."""
        checkRecipientCount(len(accepted), self.account, self._shared.config.limits.max_recipients)
        return classifyRecipient(
            recipient,
            self.account,
            self._shared.config.sms.domains,
            sender=sender,
            smtputf8=smtputf8,
        )

    def acceptMessage(
        self,
        session: SessionInfo,
        sender: EnvelopeSender,
        recipients: Sequence[Recipient],
        message: bytes,
    ) -> Deferred[str]:
        """End of DATA: content rules (policy's decision), the message rewritten as decided,
        then the queue. Raises Refusal when a rule refuses the message (or it cannot be
        rewritten); else returns a Deferred firing with the notification id once the queue has
        the message on disk (failing with Refusal when the account's daily quota or SMS
        credits ran out meanwhile, with StoreError when the store failed). Delivery is the
        delivery service's, later."""
        shared = self._shared
        config = shared.config
        now = fromTimestamp(shared.clock.seconds())
        notificationId = shared.store.nextNotificationId()
        received = receivedHeader(
            hostname=config.hostname,
            helo=session.helo,
            clientAddress=session.client_address,
            tlsInfo=session.tls_version,
            authenticated=session.authenticated,
            notificationId=notificationId,
            now=now,
            recipients=recipients,
        )
        content = checkContent(
            message,
            self.account,
            recipients,
            senders=self._senders or (),
            envelopeSender=sender,
            smsDomains=config.sms.domains,
        )
        prepared = rewriteMessage(
            message,
            content,
            hostname=config.hostname,
            now=now,
            notificationId=notificationId,
            received=received,
        )
        notification = Notification(
            notification_id=notificationId,
            account=self.account.name,
            sender=sender.value,
            recipients=tuple(recipients),
            size=prepared.size,
            received_at=now,
            options=content.options,
            client_address=session.client_address,
            helo=session.helo,
        )
        # No log line per message: at thousands a second it would cost more than the rest of
        # the intake path; the status trail and the metrics are the record.
        credits = smsCost(self.account, recipients, content.smsLength)
        if self.account.daily_quota is not None:
            d = self._storeWithinQuota(notification, prepared.pieces, credits)
        elif credits:
            d = shared.store.enqueue(notification, prepared.pieces, smsCredits=credits)
        else:
            d = shared.store.enqueue(notification, prepared.pieces)
        if credits:
            d.addErrback(_creditsRefused, credits)
        return d.addCallback(self._stored, notificationId)

    def _stored(self, _: object, notificationId: str) -> str:
        self._shared.stored()
        return notificationId

    @inlineCallbacks
    def _storeWithinQuota(
        self, notification: Notification, pieces: MessageText, credits: int = 0
    ) -> Any:
        """
        Store a message of an account with a daily quota, if it still fits: the check at MAIL
        let every session that was open at the time through, and each of them may since have
        been stored. So the count is read again here, and this process's other messages of
        the account still being stored count too. (Between processes, or relays sharing a
        Redis store, a race at the very limit can still let one message each through.)
        """
        shared, name = self._shared, self.account.name
        shared.storing[name] += 1
        try:
            today = startOfDay(fromTimestamp(shared.clock.seconds()))
            accepted = yield shared.store.acceptedSince(name, today)
            checkDailyQuota(self.account, accepted + shared.storing[name] - 1)
            if credits:
                yield shared.store.enqueue(notification, pieces, smsCredits=credits)
            else:
                yield shared.store.enqueue(notification, pieces)
        finally:
            shared.storing[name] -= 1
            if not shared.storing[name]:
                del shared.storing[name]
        return notification.notification_id
