"""
The one test suite every store backend passes (``class XTests(StoreTestsMixin, TestCase)``).

Everything here goes through :class:`mailrelay.interfaces.IStore` only. A backend's test case
provides two hooks: ``makeStore()`` (an opened store, closed again by the test's cleanup) and
``finishDelivery(notificationId)`` (take a notification off the queue, as a delivery worker
would once it is done -- the interface has no such method yet). Its own extra tests may use
:class:`StoreHelpersMixin` alone.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from mailrelay.interfaces import AlreadyExists, IStore, NotFound, StoreError
from mailrelay.model import (
    Account,
    ApiKey,
    HeaderOptions,
    Notification,
    QueueStats,
    Recipient,
    Sender,
    StatusEvent,
    fromTimestamp,
)
from mailrelay.policy.limits import startOfDay
from mailrelay.store.common import ACCOUNT_CACHE_SECONDS

BODY = b"Subject: hi\r\n\r\nhello\r\n"
"""The message every helper-made notification carries."""

T0 = datetime(2015, 3, 8, 14, 58, 30, 252000, tzinfo=UTC)
"""A moment with whole milliseconds, the precision every backend keeps."""

ALICE = Recipient("name1@customer.com", "email")
BOB = Recipient("name2@customer.com", "email")
PHONE = Recipient("+4477331234567", "sms")


class StoreHelpersMixin:
    """Makes the store before each test, and notifications to put in it."""

    store: Any

    # -- hooks for the backend's test case --

    def makeStore(self) -> IStore | Deferred[IStore]:
        """An opened, empty store, closed again by the test's cleanup."""
        raise NotImplementedError

    def finishDelivery(self, notificationId: str) -> Deferred[None]:
        """Take a notification off the queue, as a delivery worker does when done."""
        raise NotImplementedError

    # -- helpers --

    def setUp(self) -> Deferred[None]:
        d = maybeDeferred(self.makeStore)
        d.addCallback(lambda store: setattr(self, "store", store))
        return d

    def notification(
        self,
        account: str = "acme",
        recipients: tuple[Recipient, ...] = (ALICE, PHONE),
        receivedAt: datetime = T0,
        bulkId: str | None = None,
    ) -> Notification:
        return Notification(
            notification_id=self.store.nextNotificationId(),
            account=account,
            sender="app@acme.example",
            recipients=recipients,
            size=1234,
            received_at=receivedAt,
            options=HeaderOptions(
                bulk_id=bulkId,
                notify_url="https://acme.example/dlr",
                notify_content_type="application/xml",
                callback_data="ref 42",
                intermediate_report=True,
                tracking_url="https://acme.example/t",
            ),
            client_address="192.0.2.7",
            helo="erp.acme.example",
        )

    async def enqueued(self, **kwargs: Any) -> Notification:
        notification = self.notification(**kwargs)
        await self.store.enqueue(notification, BODY)
        return notification


class StoreTestsMixin(StoreHelpersMixin):
    """Tests of IStore's behaviour; mix into a ``twisted.trial.unittest.TestCase``."""

    def test_providesIStore(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertIn(self.store.name, ("sqlite", "redis"))

    async def test_ping(self) -> None:
        seconds = await self.store.ping()
        self.assertIsInstance(seconds, float)
        self.assertGreaterEqual(seconds, 0.0)

    async def test_addAndGetAccount(self) -> None:
        account = await self.store.addAccount("acme", "$argon2id$hash")
        self.assertEqual(account, Account(name="acme", password_hash="$argon2id$hash"))
        self.assertTrue(account.enabled)
        self.assertEqual(await self.store.getAccount("acme"), account)
        self.assertIsNone(await self.store.getAccount("nobody"))

    async def test_addAccountTwice(self) -> None:
        await self.store.addAccount("acme", "h1")
        with self.assertRaises(AlreadyExists):
            await self.store.addAccount("acme", "h2")
        self.assertEqual((await self.store.getAccount("acme")).password_hash, "h1")

    async def test_listAccountsSortedByName(self) -> None:
        self.assertEqual(await self.store.listAccounts(), [])
        for name in ("zeta", "acme", "mid"):
            await self.store.addAccount(name, "h")
        names = [a.name for a in await self.store.listAccounts()]
        self.assertEqual(names, ["acme", "mid", "zeta"])

    async def test_updateAccountKeepsEveryField(self) -> None:
        await self.store.addAccount("acme", "h1")
        changed = Account(
            name="acme",
            password_hash="h2",
            enabled=False,
            sms_enabled=True,
            sms_segments=3,
            rate_per_second=2.5,
            daily_quota=1000,
            networks=("10.0.0.0/8", "2001:db8::/32"),
            require_alternative=True,
            require_rcpt_headers=True,
            attachments="strip",
            max_message_size=1024,
            max_recipients=7,
        )
        await self.store.updateAccount(changed)
        self.assertEqual(await self.store.getAccount("acme"), changed)
        cleared = dataclasses.replace(changed, rate_per_second=None, networks=())
        await self.store.updateAccount(cleared)
        self.assertEqual(await self.store.getAccount("acme"), cleared)

    async def test_updateUnknownAccount(self) -> None:
        with self.assertRaises(NotFound):
            await self.store.updateAccount(Account(name="nobody", password_hash="h"))

    async def test_apiKeys(self) -> None:
        await self.store.addAccount("acme", "h")
        key = await self.store.addApiKey("acme", "k1", "a" * 64)
        self.assertEqual((key.key_id, key.account), ("k1", "acme"))
        self.assertIsNotNone(key.created_at.tzinfo)
        self.assertEqual(await self.store.findApiKey("a" * 64), key)
        self.assertIsNone(await self.store.findApiKey("b" * 64))
        self.assertEqual(await self.store.listApiKeys("acme"), [key])
        self.assertEqual(await self.store.listApiKeys("nobody"), [])

    async def test_apiKeysOldestFirst(self) -> None:
        await self.store.addAccount("acme", "h")
        keyIds = ["k3", "k1", "k2"]
        for i, keyId in enumerate(keyIds):
            await self.store.addApiKey("acme", keyId, str(i) * 64)
        listed = await self.store.listApiKeys("acme")
        self.assertEqual([k.key_id for k in listed], keyIds)
        self.assertIsInstance(listed[0], ApiKey)

    async def test_addApiKeyErrors(self) -> None:
        with self.assertRaises(NotFound):
            await self.store.addApiKey("nobody", "k1", "a" * 64)
        await self.store.addAccount("acme", "h")
        await self.store.addApiKey("acme", "k1", "a" * 64)
        with self.assertRaises(AlreadyExists):
            await self.store.addApiKey("acme", "k2", "a" * 64)

    async def test_revokeApiKey(self) -> None:
        await self.store.addAccount("acme", "h")
        await self.store.addAccount("other", "h")
        await self.store.addApiKey("acme", "k1", "a" * 64)
        self.assertFalse(await self.store.revokeApiKey("other", "k1"))
        self.assertFalse(await self.store.revokeApiKey("acme", "nokey"))
        self.assertTrue(await self.store.revokeApiKey("acme", "k1"))
        self.assertIsNone(await self.store.findApiKey("a" * 64))
        self.assertEqual(await self.store.listApiKeys("acme"), [])
        self.assertFalse(await self.store.revokeApiKey("acme", "k1"))

    async def test_senders(self) -> None:
        await self.store.addAccount("acme", "h")
        await self.store.addAccount("other", "h")
        senders = [
            Sender("acme", "example.com", "domain"),
            Sender("acme", "InfoSMS", "sms"),
            Sender("acme", "app@example.org", "address"),
        ]
        for sender in senders:
            await self.store.addSender(sender)
        await self.store.addSender(Sender("other", "example.com", "domain"))
        listed = await self.store.listSenders("acme")
        self.assertEqual(listed, sorted(senders, key=lambda s: s.value))
        self.assertEqual(await self.store.listSenders("nobody"), [])

        self.assertTrue(await self.store.removeSender("acme", "example.com"))
        self.assertFalse(await self.store.removeSender("acme", "example.com"))
        self.assertEqual([s.value for s in await self.store.listSenders("other")], ["example.com"])

    async def test_addSenderErrors(self) -> None:
        with self.assertRaises(NotFound):
            await self.store.addSender(Sender("nobody", "example.com", "domain"))
        await self.store.addAccount("acme", "h")
        await self.store.addSender(Sender("acme", "example.com", "domain"))
        with self.assertRaises(AlreadyExists):
            await self.store.addSender(Sender("acme", "example.com", "domain"))

    def test_notificationIdsUniqueAndIncreasing(self) -> None:
        ids = [self.store.nextNotificationId() for _ in range(2000)]
        self.assertTrue(all(i.isdigit() for i in ids))
        numbers = [int(i) for i in ids]
        self.assertEqual(numbers, sorted(set(numbers)))

    async def test_enqueueThenGetNotification(self) -> None:
        notification = await self.enqueued()
        self.assertEqual(
            await self.store.getNotification(notification.notification_id), notification
        )

    async def test_getUnknownNotification(self) -> None:
        self.assertIsNone(await self.store.getNotification(self.store.nextNotificationId()))
        self.assertIsNone(await self.store.getNotification("not-an-id"))
        self.assertEqual(await self.store.statusTrail(self.store.nextNotificationId()), [])
        self.assertEqual(await self.store.statusTrail("not-an-id"), [])

    async def test_enqueueRecordsReceivedPerRecipient(self) -> None:
        notification = await self.enqueued(recipients=(ALICE, PHONE, BOB))
        trail = await self.store.statusTrail(notification.notification_id)
        expected = [
            StatusEvent(notification.notification_id, r, "CAAS_RECEIVED", "Successful", T0)
            for r in (ALICE, PHONE, BOB)
        ]
        self.assertEqual(trail, expected)

    async def test_enqueueSameIdTwice(self) -> None:
        notification = await self.enqueued()
        with self.assertRaises(StoreError):
            await self.store.enqueue(notification, b"again")
        trail = await self.store.statusTrail(notification.notification_id)
        self.assertEqual(len(trail), 2)

    async def test_stats(self) -> None:
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0))
        await self.enqueued()
        await self.enqueued()
        self.assertEqual(await self.store.stats(), QueueStats(queued=2, deferred=0, in_flight=0))

    async def test_acceptedSince(self) -> None:
        await self.enqueued(receivedAt=T0 - timedelta(days=1))
        await self.enqueued(receivedAt=T0)
        await self.enqueued(receivedAt=T0 + timedelta(hours=1))
        await self.enqueued(account="other", receivedAt=T0)
        self.assertEqual(await self.store.acceptedSince("acme", T0), 2)
        self.assertEqual(await self.store.acceptedSince("acme", T0 + timedelta(milliseconds=1)), 1)
        self.assertEqual(await self.store.acceptedSince("acme", T0 - timedelta(days=2)), 3)
        self.assertEqual(await self.store.acceptedSince("nobody", T0), 0)

    async def test_acceptedSinceMidnight(self) -> None:
        """Since the start of a UTC day, as the daily quota asks: each message counts on the
        day it was received, whichever group of writes it came in."""
        midnight = startOfDay(T0)
        await self.enqueued(receivedAt=midnight - timedelta(milliseconds=1))
        await self.enqueued(receivedAt=midnight)
        sameDay = [self.notification(receivedAt=midnight + timedelta(hours=h)) for h in (1, 2, 23)]
        await gatherResults([self.store.enqueue(n, BODY) for n in sameDay])  # one group
        await self.enqueued(receivedAt=midnight + timedelta(days=1))
        await self.enqueued(account="other", receivedAt=midnight)
        self.assertEqual(await self.store.acceptedSince("acme", midnight), 5)
        self.assertEqual(await self.store.acceptedSince("acme", midnight + timedelta(days=1)), 1)
        self.assertEqual(await self.store.acceptedSince("acme", midnight - timedelta(days=1)), 6)
        self.assertEqual(await self.store.acceptedSince("other", midnight), 1)
        self.assertEqual(await self.store.acceptedSince("nobody", midnight), 0)

    async def test_notificationsForBulk(self) -> None:
        second = await self.enqueued(bulkId="b1", receivedAt=T0 + timedelta(seconds=1))
        first = await self.enqueued(bulkId="b1", receivedAt=T0)
        await self.enqueued(bulkId="b2")
        await self.enqueued(bulkId="b1", account="other")
        await self.enqueued()
        self.assertEqual(
            await self.store.notificationsForBulk("acme", "b1"),
            [first.notification_id, second.notification_id],
        )
        self.assertEqual(await self.store.notificationsForBulk("acme", "none"), [])

    async def test_addEventsOldestFirst(self) -> None:
        notification = await self.enqueued(recipients=(ALICE,))
        nid = notification.notification_id
        later = T0 + timedelta(seconds=2)
        events = [
            StatusEvent(nid, ALICE, "CH_SENT", "Successful", T0 + timedelta(seconds=3)),
            StatusEvent(nid, ALICE, "CAAS_SENT", "Successful", later),
            StatusEvent(nid, ALICE, "CH_RECEIVED", "Successful", later),  # same time: keep order
            StatusEvent(nid, ALICE, "CH_DEFERRED", "451 try later", T0 + timedelta(seconds=1)),
        ]
        await self.store.addEvents(events[:2])
        await self.store.addEvents(events[2:])
        await self.store.addEvents([])
        trail = await self.store.statusTrail(nid)
        self.assertEqual(
            [e.status_code for e in trail],
            ["CAAS_RECEIVED", "CH_DEFERRED", "CAAS_SENT", "CH_RECEIVED", "CH_SENT"],
        )
        self.assertEqual(trail[1], events[3])

    async def test_expireKeepsQueued(self) -> None:
        notification = await self.enqueued(receivedAt=T0)
        self.assertEqual(await self.store.expire(T0 + timedelta(days=30)), 0)
        self.assertIsNotNone(await self.store.getNotification(notification.notification_id))

    async def test_expireForgetsOldDelivered(self) -> None:
        old = await self.enqueued(receivedAt=T0, bulkId="b")
        new = await self.enqueued(receivedAt=T0 + timedelta(days=8))
        stillQueued = await self.enqueued(receivedAt=T0)
        await self.finishDelivery(old.notification_id)
        await self.finishDelivery(new.notification_id)

        self.assertEqual(await self.store.expire(T0 + timedelta(days=7)), 1)

        self.assertIsNone(await self.store.getNotification(old.notification_id))
        self.assertEqual(await self.store.statusTrail(old.notification_id), [])
        self.assertEqual(await self.store.notificationsForBulk("acme", "b"), [])
        for kept in (new, stillQueued):
            self.assertEqual(await self.store.getNotification(kept.notification_id), kept)
        self.assertEqual(await self.store.expire(T0 + timedelta(days=7)), 0)


class DeliveryQueueTestsMixin:
    """
    The claim / defer / complete methods delivery workers will use (not in IStore yet; both
    backends have them), and addEvents for notifications that do not exist.
    """

    store: Any

    async def test_claimDeferComplete(self) -> None:
        notification = await self.enqueued(receivedAt=fromTimestamp(int(reactor.seconds()) - 1))
        nid = notification.notification_id
        (entry,) = await self.store.claim(10, leaseSeconds=60)
        self.assertEqual((entry.notification, entry.attempts), (notification, 1))
        self.assertEqual(entry.message, BODY)
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 1))
        self.assertEqual(await self.store.claim(10, leaseSeconds=60), [])  # leased

        await self.store.defer(nid, fromTimestamp(reactor.seconds() - 1))
        self.assertEqual(await self.store.stats(), QueueStats(0, 1, 0))
        (entry,) = await self.store.claim(10, leaseSeconds=0)
        self.assertEqual(entry.attempts, 2)
        (entry,) = await self.store.claim(10, leaseSeconds=60)  # lease of 0 ran out
        self.assertEqual(entry.attempts, 3)

        await self.store.complete(nid)
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0))
        self.assertEqual(await self.store.claim(10, leaseSeconds=60), [])
        with self.assertRaises(NotFound):
            await self.store.complete(nid)
        with self.assertRaises(NotFound):
            await self.store.defer(nid, T0)

    async def test_messageInPieces(self) -> None:
        """A message handed over in pieces (a new header, a view of the body) is stored as
        the pieces joined."""
        notification = self.notification(receivedAt=fromTimestamp(int(reactor.seconds()) - 1))
        arrived = b"xxFrom: a@example.com\r\n\r\nhello\r\n"
        await self.store.enqueue(notification, (b"Received: by x\r\n", memoryview(arrived)[2:]))
        (entry,) = await self.store.claim(10, leaseSeconds=60)
        self.assertEqual(entry.message, b"Received: by x\r\n" + arrived[2:])

    async def test_claimNotDueYet(self) -> None:
        await self.enqueued(receivedAt=fromTimestamp(reactor.seconds() + 3600))
        self.assertEqual(await self.store.claim(10, leaseSeconds=60), [])

    async def test_claimOldestDueFirst(self) -> None:
        later = await self.enqueued(receivedAt=T0 + timedelta(seconds=1))
        first = await self.enqueued(receivedAt=T0)
        sameTime = await self.enqueued(receivedAt=T0)
        await self.enqueued(receivedAt=fromTimestamp(reactor.seconds() + 3600))  # not due
        claimed = await self.store.claim(2, leaseSeconds=60)
        # Equal times: the smaller id first.
        self.assertEqual([e.notification for e in claimed], [first, sameTime])
        (entry,) = await self.store.claim(10, leaseSeconds=60)
        self.assertEqual(entry.notification, later)

    async def test_eventsForUnknownNotification(self) -> None:
        known = await self.enqueued(recipients=(ALICE,))
        events = [
            StatusEvent(known.notification_id, ALICE, "CH_SENT", "Successful", T0),
            StatusEvent(self.store.nextNotificationId(), PHONE, "CH_SENT", "Successful", T0),
        ]
        with self.assertRaises(NotFound):
            await self.store.addEvents(events)
        self.assertEqual(len(await self.store.statusTrail(known.notification_id)), 1)

    async def test_expireAfterComplete(self) -> None:
        notification = await self.enqueued(receivedAt=T0)
        await self.store.complete(notification.notification_id)
        self.assertEqual(await self.store.expire(T0 + timedelta(milliseconds=1)), 1)


class RememberedAccountDataTestsMixin:
    """
    Account, key and sender lookups may be remembered for ACCOUNT_CACHE_SECONDS: a store sees
    its own writes at once and another store's (another process's) within that time.
    ``openSharing()`` opens a second store over the same data as ``self.store``.
    """

    store: Any

    async def test_ownWritesSeenAtOnceOthersWithinASecond(self) -> None:
        first = self.store
        second = await self.openSharing()
        await first.addAccount("acme", "hash")
        await first.addSender(Sender("acme", "acme.example", "domain"))
        self.assertEqual(len(await second.listSenders("acme")), 1)
        await first.removeSender("acme", "acme.example")
        self.assertEqual(await first.listSenders("acme"), [])  # its own write: at once
        self.assertEqual(len(await second.listSenders("acme")), 1)  # another's: remembered...
        await deferLater(reactor, ACCOUNT_CACHE_SECONDS + 0.05, lambda: None)
        self.assertEqual(await second.listSenders("acme"), [])  # ...for at most a second
