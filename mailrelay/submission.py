"""
The account's avatar: decides MAIL, RCPT and the end of DATA, and stores what it accepts.

The decisions themselves are the pure functions of :mod:`mailrelay.policy`; this module fetches
what they need from the store, calls them in order, and turns an accepted message into a
durably queued notification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.config import Config
from mailrelay.interfaces import IMessageDelivery, IStore
from mailrelay.model import Account, Notification, Recipient, SessionInfo, fromTimestamp
from mailrelay.smtp import replies

log = Logger()


class Submissions:
    """What every avatar shares (store, config, clock); makes one avatar per login."""

    def __init__(self, store: IStore, config: Config, clock: Any) -> None:
        self.store = store
        self.config = config
        self.clock = clock

    def __call__(self, account: Account) -> AccountSubmission:
        return AccountSubmission(account, self)


@implementer(IMessageDelivery)
class AccountSubmission:
    def __init__(self, account: Account, shared: Submissions) -> None:
        self.account = account
        self._shared = shared
        self._senders: list[Any] | None = None

    @inlineCallbacks
    def validateFrom(self, session: SessionInfo, sender: str) -> Any:
        if self._senders is None:
            self._senders = yield self._shared.store.listSenders(self.account.name)
        lowered = sender.lower()
        domain = lowered.rpartition("@")[2]
        for registered in self._senders:
            if registered.value.lower() in (lowered, domain):
                return sender
        raise replies.Refused(replies.SENDER_NOT_ALLOWED)

    def validateTo(
        self, session: SessionInfo, sender: str, recipient: str, accepted: Sequence[Recipient]
    ) -> Recipient:
        if "@" not in recipient:
            raise replies.Refused(replies.BAD_RECIPIENT_SYNTAX)
        return Recipient(recipient, "email")

    @inlineCallbacks
    def deliverMessage(
        self,
        session: SessionInfo,
        sender: str,
        recipients: Sequence[Recipient],
        message: bytes,
    ) -> Any:
        store = self._shared.store
        notificationId = store.nextNotificationId()
        notification = Notification(
            notification_id=notificationId,
            account=self.account.name,
            sender=sender,
            recipients=tuple(recipients),
            size=len(message),
            received_at=fromTimestamp(self._shared.clock.seconds()),
            client_address=session.client_address,
            helo=session.helo,
        )
        yield store.enqueue(notification, message)
        log.info(
            "accepted {id} from {account}: {count} recipient(s), {size} bytes",
            id=notificationId,
            account=self.account.name,
            count=len(recipients),
            size=len(message),
        )
        return notificationId
