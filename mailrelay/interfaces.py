"""
The contracts between mailrelay's layers.

Every store backend (the embedded SQLite one, Redis) provides :class:`IStore`; every method that
touches the backend returns a ``Deferred`` so the same callers work over a network connection.
``tests/store_mixin.py`` holds the one test suite each backend must pass.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class StoreError(Exception):
    """The store could not do what was asked (unreachable, I/O error, ...): a temporary failure."""


class AlreadyExists(StoreError):
    """The account, sender or key being added exists already."""


class NotFound(StoreError):
    """The account (or sender, key) named does not exist."""


class IAccountStore(Interface):
    """Accounts, their API keys and their registered senders."""

    def addAccount(name: str, passwordHash: str):
        """Create an enabled account with default settings. Fails with AlreadyExists.
        Returns Deferred[Account]."""

    def getAccount(name: str):
        """Returns Deferred[Account | None]."""

    def listAccounts():
        """Returns Deferred[list[Account]] sorted by name."""

    def updateAccount(account):
        """Replace the stored settings of ``account.name`` (including password hash and enabled
        flag) with ``account``'s. Fails with NotFound. Returns Deferred[None]."""

    def addApiKey(account: str, keyId: str, keyHash: str):
        """Store an API key by the hex SHA-256 of the key. Returns Deferred[ApiKey]."""

    def findApiKey(keyHash: str):
        """The key with this hash, if not revoked. Returns Deferred[ApiKey | None]."""

    def listApiKeys(account: str):
        """The account's active (not revoked) keys. Returns Deferred[list[ApiKey]], oldest
        first."""

    def revokeApiKey(account: str, keyId: str):
        """Returns Deferred[bool]: whether a key was revoked."""

    def addSender(sender):
        """Register a Sender. Fails with AlreadyExists / NotFound. Returns Deferred[None]."""

    def listSenders(account: str):
        """Returns Deferred[list[Sender]] sorted by value."""

    def removeSender(account: str, value: str):
        """Returns Deferred[bool]: whether a sender was removed."""


class IMessageQueue(Interface):
    """The durable queue of accepted notifications that delivery workers take from."""

    def nextNotificationId() -> str:
        """A new notification id: decimal, time-ordered, unique across relay instances."""

    def enqueue(notification, message):
        """
        Durably store ``notification`` with the message bytes (a ``model.MessageText``: whole
        or in pieces) and one ``CAAS_RECEIVED`` status event per recipient, all or nothing.
        The Deferred fires only once the data is on disk (SQLite: committed with fsync) or
        acknowledged by the server (Redis); it fails with StoreError otherwise. Returns
        Deferred[None].
        """

    def acceptedSince(account: str, since):
        """How many notifications ``account`` submitted at or after ``since`` (a datetime);
        for daily quotas. Returns Deferred[int]."""

    def stats():
        """Returns Deferred[QueueStats]."""


class IStatusStore(Interface):
    """Per-recipient status trails and notification metadata."""

    def getNotification(notificationId: str):
        """Returns Deferred[Notification | None]."""

    def addEvents(events):
        """Append StatusEvents of stored notifications. Returns Deferred[None]; a backend may
        fail with NotFound for an unknown or expired notification."""

    def statusTrail(notificationId: str):
        """All events of a notification, oldest first. Returns Deferred[list[StatusEvent]]."""

    def notificationsForBulk(account: str, bulkId: str):
        """Ids of ``account``'s notifications carrying this bulk id, oldest first.
        Returns Deferred[list[str]]."""

    def expire(before):
        """Forget notifications received before ``before`` that are no longer queued,
        with their events. Returns Deferred[int]: how many."""


class IStore(IAccountStore, IMessageQueue, IStatusStore):
    """One backend: everything mailrelay keeps."""

    name = Attribute("The backend's name as written in the config: 'sqlite' or 'redis'.")

    def open():
        """Connect / create the schema. Returns Deferred[None]."""

    def close():
        """Flush pending writes and release the backend. Returns Deferred[None]."""

    def ping():
        """Check the backend answers. Returns Deferred[float]: seconds the round trip took."""


class IMessageDelivery(Interface):
    """
    The SMTP avatar: an account's side of a mail transaction.

    This is what ``twisted.mail.smtp.IMessageDelivery`` is to Twisted's ESMTP, reshaped for a
    relay that stores one notification per message (not one message per recipient). The realm
    hands one out per login; the protocol speaks the wire and asks it to decide. Each method
    returns a Deferred that fails with ``mailrelay.smtp.replies.Refused`` to answer the command
    with that reply; any other failure is answered ``451 4.3.0`` so the client retries.
    """

    account = Attribute("The model.Account this avatar submits as.")

    def validateFrom(session, sender: str, smtputf8: bool, size: int | None):
        """Decide MAIL FROM. ``sender`` is the path without brackets ('' for the null sender),
        ``size`` what the client declared with SIZE= (None: nothing), already within the
        listener's limit. Returns Deferred[sender value]: whatever the avatar wants handed
        back as ``sender`` to validateTo and deliverMessage for this transaction."""

    def validateTo(session, sender, recipient: str, accepted, smtputf8: bool):
        """Decide one RCPT TO, given the recipients already accepted (a sequence of Recipient).
        Returns Deferred[model.Recipient]."""

    def deliverMessage(session, sender, recipients, message: bytes):
        """Check the complete message and store it durably with its recipients.
        Returns Deferred[str]: the notification id, fired only once the store has it on disk."""
