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

    def enqueue(notification, message, smsCredits: int = 0):
        """
        Durably store ``notification`` with the message bytes (a ``model.MessageText``: whole
        or in pieces) and one ``CAAS_RECEIVED`` status event per recipient, all or nothing.
        The Deferred fires only once the data is on disk (SQLite: committed with fsync) or
        acknowledged by the server (Redis); it fails with StoreError otherwise. Returns
        Deferred[None].

        With ``smsCredits`` > 0, that many of the account's prepaid SMS credits are taken in
        the same write, if it has that many (an account without a prepaid limit is not
        charged); if not, it fails with InsufficientCredits and stores nothing. Two sessions
        racing for the last credits cannot both have them.
        """

    def acceptedSince(account: str, since):
        """How many notifications ``account`` submitted at or after ``since`` (a datetime);
        for daily quotas. Returns Deferred[int]."""

    def stats():
        """Returns Deferred[QueueStats]."""


class InsufficientCredits(StoreError):
    """The account's prepaid SMS credits do not cover the message: nothing was stored."""


class LeaseLost(StoreError):
    """The lease named is no longer the notification's current one (it ran out and another
    worker claimed it, or the notification left the queue): nothing was written."""


class IDeliveryQueue(Interface):
    """
    The delivery side of the queue (SPEC §8.1): delivery workers claim due notifications under
    a lease, record each recipient's outcome with its status event in one atomic write, and
    schedule retries. Several workers -- threads, processes, relays sharing one Redis -- may
    claim at once: a notification is leased to one of them at a time.

    A notification is *due* when it is ``queued`` or ``deferred`` and its next attempt has
    come, or ``in_flight`` and its lease has run out (a worker died). ``held`` is never due.
    Due work is found through an index ordered by due time, never by reading the whole queue.
    """

    def claimDue(limit: int, leaseSeconds: float, firstAttempt=None):
        """
        Claim up to ``limit`` due notifications: each becomes ``in_flight`` under a new lease
        (a fresh random token) ending ``leaseSeconds`` from now, and its attempt count grows
        by one. Oldest due first, but never-tried (``queued``) work and retries (``deferred``,
        lapsed leases) each get at least half of ``limit`` when both are due, so a backlog of
        retries cannot starve fresh mail nor the reverse. A notification whose message cannot
        be read is skipped (logged), not handed out. ``firstAttempt`` (a
        model.FirstAttempt), if given, is called with each Delivery of attempt 1 and what it
        returns (its CAAS_SENT events and their reports) is written with the claim, as one
        write, rather than by a write of its own. Returns Deferred[list[model.Delivery]].
        """

    def renewLease(notificationId: str, lease: str, leaseSeconds: float):
        """Extend ``lease`` to end ``leaseSeconds`` from now. Fails with LeaseLost.
        Returns Deferred[None]."""

    def recordOutcome(notificationId: str, lease: str, events, finished, nextAttempt, reports=()):
        """
        One atomic write: append ``events`` (StatusEvents of this notification), put
        ``reports`` (PendingReports of this notification, due at once) in the report outbox
        (IReportQueue), and take the
        recipients in ``finished`` (a sequence of Recipient with a final outcome) out of the
        pending ones. Then, if none is pending, the notification leaves the queue and its
        message is dropped; else, with ``nextAttempt`` (a datetime) it becomes ``deferred``
        until then and the lease ends; with ``nextAttempt`` None it stays ``in_flight`` under
        the same lease (an intermediate record, such as ``CAAS_SENT`` when an attempt starts).
        Fails with LeaseLost, writing nothing, if ``lease`` is not the current lease.
        Returns Deferred[None].
        """

    def releaseLease(notificationId: str, lease: str):
        """Give the claim back without an outcome (the relay is stopping): due again at once,
        the attempt it counted taken back. Fails with LeaseLost. Returns Deferred[None]."""

    def queueItems(state, account, limit: int):
        """The queue as an operator sees it: up to ``limit`` entries (``state`` a QueueState or
        None for all, ``account`` a name or None for all), by next attempt, oldest first.
        Returns Deferred[list[model.QueueItem]]."""

    def queueItem(notificationId: str):
        """Returns Deferred[model.QueueItem | None]."""

    def retryNow(notificationId):
        """Make ``deferred`` (and ``queued``) entries due now: the one named, or every one
        with None. Held and in-flight ones are left. Returns Deferred[int]: how many."""

    def hold(notificationId, account):
        """Hold the entry named, or (``notificationId`` None) every entry of ``account``: it is
        not claimed until released. An entry in flight is held when its worker records a
        retry (its lease is left alone). Returns Deferred[int]: how many are held now."""

    def release(notificationId, account):
        """Release held entries (the one named, or every one of ``account``, or every one
        with both None): due at once. Returns Deferred[int]: how many."""

    def deleteQueued(notificationId: str, statusText: str, at):
        """Take a notification out of the queue for good (an operator's decision): each
        recipient still pending gets a ``CAAS_FAILED`` event with ``statusText`` at ``at``,
        in the same write, and the message is dropped. A worker that holds it in flight then
        finds its lease lost. Returns Deferred[list[Recipient]]: the recipients failed;
        NotFound if it is not in the queue."""


class IDkimKeyStore(Interface):
    """DKIM signing keys per sender domain, shared by every relay using the store."""

    def putDkimKey(key):
        """Store ``key`` (a model.DkimKey) for its domain, replacing any other. Returns
        Deferred[None]."""

    def getDkimKey(domain: str):
        """Returns Deferred[model.DkimKey | None]."""

    def listDkimKeys():
        """Returns Deferred[list[model.DkimKey]] sorted by domain."""

    def removeDkimKey(domain: str):
        """Returns Deferred[bool]: whether a key was removed."""


class IStatusStore(Interface):
    """Per-recipient status trails and notification metadata."""

    def getNotification(notificationId: str):
        """Returns Deferred[Notification | None]."""

    def addEvents(events):
        """Append StatusEvents of stored notifications. Returns Deferred[None]; a backend may
        fail with NotFound for an unknown or expired notification."""

    def statusTrail(notificationId: str):
        """All events of a notification, oldest first. Returns Deferred[list[StatusEvent]]."""

    def notificationWithTrail(notificationId: str):
        """The notification and all its events, as ``getNotification`` and ``statusTrail``
        give them, read together (the status API's answer). Returns
        Deferred[tuple[Notification | None, list[StatusEvent]]]."""

    def notificationsForBulk(account: str, bulkId: str):
        """Ids of ``account``'s notifications carrying this bulk id, oldest first.
        Returns Deferred[list[str]]."""

    def expire(before):
        """Forget notifications received before ``before`` that are no longer queued, with
        everything kept about them: their events, their reports still in the outbox (claimed
        or not) and the attempts of their reports (IReportQueue), the gateway ids of their
        texts (IGatewayIds). Gateway ids past their time go too. Returns Deferred[int]: how
        many notifications."""


class IReportQueue(Interface):
    """
    The outbox of delivery and tracking reports (SPEC §8.4, §8.5), and the secrets they are
    signed with. A report enters it in the same write as the status event it reports
    (``recordOutcome``'s ``reports``, :meth:`addEventsWithReports`), so none is lost between
    an outcome and its report. Dispatchers claim due reports under a lease (several relays may
    share a store), and record each POST's answer: done, or due again at a later time.
    """

    def addEventsWithReports(events, reports):
        """Append ``events`` (StatusEvents) and put ``reports`` (PendingReports, due at once)
        in the outbox in one atomic write, for what happens outside a delivery attempt (a
        tracked open or click, an SMS receipt). Every event and report must be of one
        notification. Returns Deferred[None]; NotFound for an unknown notification (nothing
        written)."""

    def claimReports(limit: int, leaseSeconds: float):
        """Claim up to ``limit`` due reports, oldest due first, under a new lease ending
        ``leaseSeconds`` from now (then due again unless recorded). Returns
        Deferred[list[model.ClaimedReport]]."""

    def recordReportAttempt(claims, attempt, nextAttempt):
        """For each ``(reportId, lease)`` in ``claims`` whose lease is current: append
        ``attempt`` (a model.ReportAttempt) to its notification's attempts, and either drop
        it from the outbox (``nextAttempt`` None) or make it due at ``nextAttempt`` with one
        attempt more. With ``attempt`` None the claim is given back uncounted (a dispatcher
        stopping): due at ``nextAttempt``, or at once with None. Claims whose lease is not
        current are left alone. Returns Deferred[int]: how many were written."""

    def reportAttempts(notificationId: str):
        """The POSTs of a notification's reports, oldest first.
        Returns Deferred[list[model.ReportAttempt]]."""

    def pendingReports():
        """Returns Deferred[int]: how many reports are in the outbox."""

    def markGone(url: str):
        """Remember that ``url`` answered ``410 Gone``: no report goes there any more.
        Returns Deferred[None]."""

    def isGone(url: str):
        """Returns Deferred[bool]: whether ``url`` answered ``410 Gone`` once."""

    def webhookSecrets(account: str):
        """The account's signing secrets, newest first (two during a rotation, else one or
        none). Returns Deferred[tuple[str, ...]]."""

    def setWebhookSecrets(account: str, secrets):
        """Replace the account's signing secrets (a sequence of str, newest first).
        Returns Deferred[None]."""

    def sharedKey(name: str, candidate: bytes):
        """The key stored under ``name``; stores ``candidate`` first if there is none, so
        every relay sharing the store gets the same one. Returns Deferred[bytes]."""


class IGatewayIds(Interface):
    """
    The message ids SMS gateways gave the texts they accepted, kept until the texts' delivery
    receipts come (SPEC §8.1). An SMPP receipt names nothing but that id, and it may reach any
    relay sharing the store, before or after a restart. A text sent in several parts has one
    id per part: it is delivered when every part is, failed as soon as one part is.

    Every id is kept with a time limit: past it, it is forgotten whether or not its receipt
    came, so ids whose receipts never come do not pile up. ``IStatusStore.expire`` forgets the
    ids of the notifications it forgets.
    """

    def rememberGatewayIds(notificationId: str, recipient, ids, until):
        """Remember that ``ids`` (a sequence of str, the parts of one text) are those of the
        text of the stored notification ``notificationId`` to ``recipient`` (a Recipient),
        until ``until`` (a datetime). An id already remembered is taken over by this text.
        Returns Deferred[None]; NotFound for an unknown notification (nothing written)."""

    def lookupGatewayId(gatewayId: str):
        """The text ``gatewayId`` belongs to. Returns Deferred[tuple[str, Recipient,
        tuple[str, ...]] | None]: its notification id, its recipient and the ids of its parts
        not settled yet, sorted (``gatewayId`` among them); None for an id unknown, settled
        or past its time."""

    def settleGatewayId(gatewayId: str, delivered: bool = True):
        """Apply a final receipt for ``gatewayId`` in one atomic step: ``delivered``, its part
        is done (forgotten); not ``delivered``, the whole text failed and every part is
        forgotten. Returns Deferred[bool]: whether this receipt settles the text -- True once
        per text, for its last part delivered or its first part failed; False for a part
        whose text has more to come, and for an id unknown, settled already or past its time
        (a receipt repeated, or one that came to two relays at once)."""


class IStore(
    IAccountStore,
    IMessageQueue,
    IDeliveryQueue,
    IDkimKeyStore,
    IStatusStore,
    IReportQueue,
    IGatewayIds,
):
    """One backend: everything mailrelay keeps."""

    name = Attribute(
        "The backend's name as written in the config: 'sqlite' or 'redis' (or 'memory': the "
        "test store of mailrelay.testing, which no config names)."
    )

    def open():
        """Connect / create the schema. Returns Deferred[None]."""

    def close():
        """Flush pending writes and release the backend. Returns Deferred[None]."""

    def ping():
        """Check the backend answers. Returns Deferred[float]: seconds the round trip took."""


class ISubmission(Interface):
    """
    The SMTP avatar: an account's side of a mail transaction, from MAIL to the end of DATA.

    The realm hands one out per login; the protocol speaks the wire and asks it to decide. (Its
    part is that of ``twisted.mail.smtp.IMessageDelivery`` in Twisted's ESMTP, with other
    signatures: a relay that queues one notification per message, not one message per
    recipient.) A decision is either the value itself or a Deferred firing with it; a refusal
    is a ``mailrelay.policy.decisions.Refusal``, raised or as the Deferred's failure, which the
    protocol answers with the refusal's reply; any other failure is answered ``451 4.3.0`` so
    the client retries.
    """

    account = Attribute("The model.Account this avatar submits as.")

    def validateFrom(session, sender: str, smtputf8: bool, size: int | None):
        """Decide MAIL FROM. ``sender`` is the path without brackets ('' for the null sender),
        ``size`` what the client declared with SIZE= (None: nothing), already within the
        listener's limit. Returns the sender value, or a Deferred firing with it: whatever the
        avatar wants handed back as ``sender`` to validateTo and acceptMessage for this
        transaction."""

    def validateTo(session, sender, recipient: str, accepted, smtputf8: bool):
        """Decide one RCPT TO, given the recipients already accepted (a sequence of Recipient):
        the recipient limit, then the recipient. Returns the model.Recipient (no Deferred)."""

    def acceptMessage(session, sender, recipients, message: bytes):
        """Check the complete message and put it in the queue with its recipients (delivery
        comes later, from the queue). Returns Deferred[str]: the notification id, fired only
        once the queue has it on disk."""
