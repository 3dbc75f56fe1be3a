"""
The one test suite every store backend passes (``class XTests(StoreTestsMixin, TestCase)``).

Everything here goes through :class:`mailrelay.interfaces.IStore` only. A backend's test case
provides the hooks ``makeStore()`` (an opened store, closed again by the test's cleanup) and
``bodyStored(notificationId)`` (whether the backend still keeps that message's bytes). Its
own extra tests may use :class:`StoreHelpersMixin` alone.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from mailrelay.interfaces import AlreadyExists, IStore, LeaseLost, NotFound, StoreError
from mailrelay.model import (
    STATUS_TEXTS,
    Account,
    ApiKey,
    Delivery,
    DkimKey,
    HeaderOptions,
    Notification,
    PendingReport,
    QueueItem,
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

    async def bodyStored(self, notificationId: str) -> bool:
        """Whether the store still keeps the message bytes of ``notificationId``."""
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

    async def finishDelivery(self, notificationId: str, store: Any = None) -> None:
        """Take a notification off the queue as a delivery worker does when it is done:
        claim it (giving back whatever else was due) and record every recipient finished."""
        store = store or self.store
        finished = False
        for delivery in await store.claimDue(1000, 60):
            nid = delivery.notification.notification_id
            if nid == notificationId:
                await store.recordOutcome(nid, delivery.lease, [], delivery.pending, None)
                finished = True
            else:
                await store.releaseLease(nid, delivery.lease)
        assert finished, f"{notificationId} was not due"


class StoreTestsMixin(StoreHelpersMixin):
    """Tests of IStore's behaviour; mix into a ``twisted.trial.unittest.TestCase``."""

    def test_providesIStore(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertIn(self.store.name, ("sqlite", "redis", "memory"))  # memory: mailrelay.testing

    async def test_ping(self) -> None:
        seconds = await self.store.ping()
        self.assertIsInstance(seconds, float)
        self.assertGreaterEqual(seconds, 0.0)

    async def test_addAndGetAccount(self) -> None:
        account = await self.store.addAccount("acme", "$argon2id$hash")
        self.assertEqual(account, Account(name="acme", password_hash="$argon2id$hash"))
        self.assertTrue(account.enabled)
        self.assertTrue(account.bounces)
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
            bounces=False,
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
        for unknown in (self.store.nextNotificationId(), "not-an-id"):
            self.assertEqual(await self.store.notificationWithTrail(unknown), (None, []))

    async def test_notificationWithTrail(self) -> None:
        """The notification and its trail read together: what getNotification and
        statusTrail give, events added after the enqueue included."""
        notification = await self.enqueued(recipients=(ALICE, BOB))
        nid = notification.notification_id
        sent = StatusEvent(nid, BOB, "CH_RECEIVED", "250 2.0.0 Ok", T0 + timedelta(seconds=1))
        await self.store.addEvents([sent])
        await self.enqueued()  # another notification: not part of it
        found, trail = await self.store.notificationWithTrail(nid)
        self.assertEqual(found, notification)
        self.assertEqual(list(trail), await self.store.statusTrail(nid))
        self.assertEqual([e.status_code for e in trail], ["CAAS_RECEIVED"] * 2 + ["CH_RECEIVED"])

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

    async def test_expireForgetsReportsAndGatewayIds(self) -> None:
        """An expired notification's reports go from the outbox, claimed or not, with the
        attempts of its reports and the gateway ids of its texts; a newer one's stay."""
        from mailrelay.model import ReportAttempt

        old = await self.enqueued(receivedAt=T0, recipients=(PHONE,))
        new = await self.enqueued(receivedAt=T0 + timedelta(days=8), recipients=(PHONE,))
        oldId, newId = old.notification_id, new.notification_id
        event = StatusEvent(oldId, PHONE, "CH_SENT", "Successful", past(0))
        await self.store.addEventsWithReports([event], [pendingReport(old, 0)])
        await self.store.addEventsWithReports([event], [pendingReport(old, 1)])
        sent, claimed = await self.store.claimReports(10, leaseSeconds=60)
        attempt = ReportAttempt(oldId, "", "acme.example", 200, "sent", past(0))
        self.assertEqual(
            await self.store.recordReportAttempt(
                [(sent.report.report_id, sent.lease)], attempt, None
            ),
            1,
        )
        await self.store.addEventsWithReports([event], [pendingReport(old, 2)])  # not claimed
        # Made once: its time is now, in whole seconds, and the comparison below must not
        # fall on the other side of a second.
        newReport = pendingReport(new, 0)
        await self.store.addEventsWithReports(
            [dataclasses.replace(event, notification_id=newId)], [newReport]
        )
        await self.store.rememberGatewayIds(oldId, PHONE, ["o1", "o2"], future(3 * 86400))
        await self.store.rememberGatewayIds(newId, PHONE, ["n1"], future(3 * 86400))
        await self.finishDelivery(oldId)
        await self.finishDelivery(newId)
        self.assertEqual(await self.store.pendingReports(), 3)

        self.assertEqual(await self.store.expire(T0 + timedelta(days=7)), 1)

        self.assertEqual(await self.store.pendingReports(), 1)
        (left,) = await self.store.claimReports(10, leaseSeconds=60)
        self.assertEqual(left.report, newReport)
        self.assertEqual(await self.store.reportAttempts(oldId), [])
        self.assertEqual(
            await self.store.recordReportAttempt(
                [(claimed.report.report_id, claimed.lease)], attempt, None
            ),
            0,
        )
        self.assertIsNone(await self.store.lookupGatewayId("o1"))
        self.assertFalse(await self.store.settleGatewayId("o2"))
        self.assertEqual(await self.store.lookupGatewayId("n1"), (newId, PHONE, ("n1",)))


def pendingReport(notification: Notification, n: int = 0) -> PendingReport:
    """Report ``n`` of ``notification``, made now."""
    return PendingReport(
        report_id=f"msg_{notification.notification_id}_{n}",
        notification_id=notification.notification_id,
        account=notification.account,
        url="https://acme.example/dlr",
        content_type="application/json",
        kind="delivery",
        result=json.dumps({"messageId": notification.notification_id}),
        created_at=past(0),
    )


def past(seconds: float = 1) -> datetime:
    """A moment ``seconds`` before now, by the reactor's clock (which the stores read)."""
    return fromTimestamp(int(reactor.seconds() - seconds))


def future(seconds: float = 3600) -> datetime:
    return fromTimestamp(int(reactor.seconds() + seconds))


class DeliveryQueueTestsMixin:
    """IDeliveryQueue and IDkimKeyStore: claims under a lease, outcomes, the operator's view
    of the queue, DKIM keys; and addEvents for notifications that do not exist."""

    store: Any

    def event(self, notification: Notification, recipient: Recipient, code: str) -> StatusEvent:
        return StatusEvent(
            notification.notification_id, recipient, code, STATUS_TEXTS[code], past(0)
        )

    async def test_claimRecordFinish(self) -> None:
        """A claim, an intermediate record, a partial finish with a retry, a claim of what
        is left, and the last record: the notification leaves the queue, its body with it."""
        notification = await self.enqueued(recipients=(ALICE, PHONE, BOB))
        nid = notification.notification_id
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertIsInstance(delivery, Delivery)
        self.assertEqual(delivery.notification, notification)
        self.assertEqual((delivery.message, delivery.attempts), (BODY, 1))
        self.assertEqual(delivery.pending, (ALICE, PHONE, BOB))
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 1))
        self.assertEqual(await self.store.claimDue(10, leaseSeconds=60), [])  # leased

        started = [self.event(notification, r, "CAAS_SENT") for r in (ALICE, PHONE, BOB)]
        await self.store.recordOutcome(nid, delivery.lease, started, (), None)
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 1))  # still in flight
        await self.store.renewLease(nid, delivery.lease, 60)

        outcome = [
            self.event(notification, ALICE, "CH_RECEIVED"),
            self.event(notification, PHONE, "CH_DEFERRED"),
            self.event(notification, BOB, "CH_DEFERRED"),
        ]
        retryAt = past()
        await self.store.recordOutcome(nid, delivery.lease, outcome, [ALICE], retryAt)
        self.assertEqual(await self.store.stats(), QueueStats(0, 1, 0))
        item = await self.store.queueItem(nid)
        self.assertEqual((item.state, item.attempts, item.pending), ("deferred", 1, (PHONE, BOB)))
        self.assertEqual(item.next_attempt, retryAt)

        (again,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual((again.pending, again.attempts), ((PHONE, BOB), 2))
        self.assertNotEqual(again.lease, delivery.lease)
        done = [self.event(notification, r, "CH_RECEIVED") for r in (PHONE, BOB)]
        await self.store.recordOutcome(nid, again.lease, done, [BOB, PHONE], None)

        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0))
        self.assertIsNone(await self.store.queueItem(nid))
        self.assertEqual(await self.store.claimDue(10, leaseSeconds=60), [])
        self.assertFalse(await self.bodyStored(nid))
        trail = await self.store.statusTrail(nid)
        self.assertEqual(trail[3:], [*started, *outcome, *done])
        with self.assertRaises(LeaseLost):
            await self.store.renewLease(nid, again.lease, 60)

    async def test_firstAttemptWrittenWithTheClaim(self) -> None:
        """What ``firstAttempt`` gives is in the trail and the report outbox once the claim
        is answered, for attempt 1 only: a second claim of the same notification (a lapsed
        lease) is not asked."""
        notification = await self.enqueued(recipients=(ALICE, BOB))
        nid = notification.notification_id
        asked: list[int] = []

        def firstAttempt(delivery: Delivery) -> tuple[tuple[StatusEvent, ...], Any]:
            asked.append(delivery.attempts)
            started = tuple(self.event(notification, r, "CAAS_SENT") for r in delivery.pending)
            return started, (pendingReport(notification, 7),)

        (delivery,) = await self.store.claimDue(10, 0, firstAttempt)
        self.assertEqual(delivery.attempts, 1)
        trail = await self.store.statusTrail(nid)
        self.assertEqual(
            [(e.recipient, e.status_code) for e in trail[-2:]],
            [
                (ALICE, "CAAS_SENT"),
                (BOB, "CAAS_SENT"),
            ],
        )
        reports = await self.store.claimReports(10, leaseSeconds=60)
        self.assertIn(f"msg_{nid}_7", [claimed.report.report_id for claimed in reports])
        (again,) = await self.store.claimDue(10, 60, firstAttempt)  # the lease ran out
        self.assertEqual((again.attempts, asked), (2, [1]))
        self.assertEqual(len(await self.store.statusTrail(nid)), len(trail))

    async def test_staleLease(self) -> None:
        """A lease that ran out and was claimed again is lost: renew, record and release
        with it fail with LeaseLost and write nothing."""
        notification = await self.enqueued(recipients=(ALICE,))
        nid = notification.notification_id
        (stale,) = await self.store.claimDue(10, leaseSeconds=0)
        (current,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(current.attempts, 2)
        self.assertNotEqual(current.lease, stale.lease)
        sent = self.event(notification, ALICE, "CH_SENT")
        with self.assertRaises(LeaseLost):
            await self.store.recordOutcome(nid, stale.lease, [sent], [ALICE], None)
        with self.assertRaises(LeaseLost):
            await self.store.renewLease(nid, stale.lease, 60)
        with self.assertRaises(LeaseLost):
            await self.store.releaseLease(nid, stale.lease)
        self.assertEqual(len(await self.store.statusTrail(nid)), 1)
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 1))
        item = await self.store.queueItem(nid)
        self.assertEqual((item.state, item.attempts, item.pending), ("in_flight", 2, (ALICE,)))
        self.assertTrue(await self.bodyStored(nid))
        await self.store.recordOutcome(nid, current.lease, [sent], [ALICE], None)
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0))

    async def test_unknownLease(self) -> None:
        unknown = self.store.nextNotificationId()
        for call in (
            lambda: self.store.renewLease(unknown, "nope", 60),
            lambda: self.store.recordOutcome(unknown, "nope", [], [], None),
            lambda: self.store.releaseLease(unknown, "nope"),
        ):
            with self.assertRaises(LeaseLost):
                await call()
        notification = await self.enqueued()  # queued, not in flight
        with self.assertRaises(LeaseLost):
            await self.store.renewLease(notification.notification_id, "nope", 60)

    async def test_releaseLease(self) -> None:
        """A claim given back is due at once, the attempt it counted taken back: a never
        tried notification is queued (fresh) again, a retried one deferred."""
        notification = await self.enqueued(recipients=(ALICE, BOB))
        nid = notification.notification_id
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        await self.store.releaseLease(nid, delivery.lease)
        self.assertEqual(await self.store.stats(), QueueStats(1, 0, 0))
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(delivery.attempts, 1)
        await self.store.recordOutcome(nid, delivery.lease, [], [ALICE], future())
        await self.store.retryNow(nid)
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual((delivery.attempts, delivery.pending), (2, (BOB,)))
        await self.store.releaseLease(nid, delivery.lease)
        item = await self.store.queueItem(nid)
        self.assertEqual((item.state, item.attempts, item.pending), ("deferred", 1, (BOB,)))
        self.assertLessEqual(item.next_attempt, fromTimestamp(reactor.seconds()))
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(delivery.attempts, 2)
        with self.assertRaises(LeaseLost):  # not its token
            await self.store.releaseLease(nid, "x" + delivery.lease)

    async def retries(self, count: int, due: datetime) -> list[Notification]:
        """``count`` notifications tried once and deferred until ``due``."""
        notifications = [await self.enqueued(receivedAt=T0) for _ in range(count)]
        for delivery in await self.store.claimDue(count, leaseSeconds=60):
            nid = delivery.notification.notification_id
            await self.store.recordOutcome(nid, delivery.lease, [], [], due)
        self.assertEqual((await self.store.stats()).deferred, count)
        return notifications

    async def test_fairShareOfFreshMail(self) -> None:
        """Many due retries, older than the fresh mail: a claim of 4 still takes 2 fresh."""
        retries = await self.retries(10, T0 + timedelta(seconds=1))
        fresh = [await self.enqueued(receivedAt=T0 + timedelta(days=1)) for _ in range(3)]
        claimed = await self.store.claimDue(4, leaseSeconds=60)
        ids = [d.notification.notification_id for d in claimed]
        self.assertEqual(ids, [n.notification_id for n in (*retries[:2], *fresh[:2])])
        # Once one kind runs out, the other fills the claim.
        claimed = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(len(claimed), 9)
        self.assertEqual(claimed[-1].notification, fresh[2])

    async def test_fairShareOfRetries(self) -> None:
        """Many fresh notifications older than the due retries: a claim of 4 takes 2 retries
        (and an odd limit gives the extra one to the oldest)."""
        retries = await self.retries(3, past())
        fresh = [await self.enqueued(receivedAt=T0 - timedelta(days=1)) for _ in range(10)]
        claimed = await self.store.claimDue(5, leaseSeconds=60)
        ids = [d.notification.notification_id for d in claimed]
        self.assertEqual(ids, [n.notification_id for n in (*fresh[:3], *retries[:2])])
        self.assertEqual([d.attempts for d in claimed], [1, 1, 1, 2, 2])

    async def test_hold(self) -> None:
        held = await self.enqueued()
        other = await self.enqueued(account="other")
        self.assertEqual(await self.store.hold(held.notification_id, None), 1)
        self.assertEqual(await self.store.hold(held.notification_id, None), 1)  # still
        self.assertEqual(await self.store.stats(), QueueStats(1, 0, 0, held=1))
        self.assertEqual((await self.store.queueItem(held.notification_id)).state, "held")
        (delivery,) = await self.store.claimDue(10, leaseSeconds=0)
        self.assertEqual(delivery.notification, other)
        self.assertEqual(await self.store.retryNow(held.notification_id), 0)
        self.assertEqual(await self.store.release(held.notification_id, None), 1)
        self.assertEqual(await self.store.release(held.notification_id, None), 0)
        item = await self.store.queueItem(held.notification_id)
        self.assertEqual((item.state, item.attempts), ("queued", 0))
        claimed = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual({d.notification for d in claimed}, {held, other})

    async def test_holdByAccount(self) -> None:
        mine = [await self.enqueued() for _ in range(2)]
        theirs = await self.enqueued(account="other")
        (inFlight,) = await self.store.claimDue(1, leaseSeconds=60)
        self.assertEqual(inFlight.notification, mine[0])
        self.assertEqual(await self.store.hold(None, "acme"), 1)  # the one in flight: later
        self.assertEqual(await self.store.stats(), QueueStats(1, 0, 1, held=1))
        (claimed,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(claimed.notification, theirs)
        # Its worker records a retry: held, not deferred.
        nid = inFlight.notification.notification_id
        await self.store.recordOutcome(nid, inFlight.lease, [], [], past())
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 1, held=2))
        self.assertEqual((await self.store.queueItem(nid)).state, "held")
        self.assertEqual(await self.store.claimDue(10, leaseSeconds=60), [])
        self.assertEqual(await self.store.release(None, "other"), 0)
        self.assertEqual(await self.store.release(None, None), 2)
        self.assertEqual(await self.store.stats(), QueueStats(1, 1, 1, held=0))
        self.assertEqual(len(await self.store.claimDue(10, leaseSeconds=60)), 2)

    async def test_holdInFlightThenGivenBack(self) -> None:
        """An entry held while in flight is held when its claim is given back, or when its
        lease runs out; released, it is due again."""
        notification = await self.enqueued()
        nid = notification.notification_id
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(await self.store.hold(nid, None), 0)  # not yet
        await self.store.releaseLease(nid, delivery.lease)
        self.assertEqual((await self.store.queueItem(nid)).state, "held")
        self.assertEqual(await self.store.release(None, "acme"), 1)
        (delivery,) = await self.store.claimDue(10, leaseSeconds=0)
        self.assertEqual(await self.store.hold(None, "acme"), 0)
        self.assertEqual(await self.store.claimDue(10, leaseSeconds=60), [])  # lapsed: held
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0, held=1))
        with self.assertRaises(LeaseLost):
            await self.store.recordOutcome(nid, delivery.lease, [], [], None)

    async def test_releaseUnmarksInFlight(self) -> None:
        notification = await self.enqueued()
        nid = notification.notification_id
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        await self.store.hold(nid, None)
        self.assertEqual(await self.store.release(nid, None), 0)
        await self.store.recordOutcome(nid, delivery.lease, [], [], past())
        self.assertEqual((await self.store.queueItem(nid)).state, "deferred")

    async def test_retryNow(self) -> None:
        first, second = await self.retries(2, future())
        queuedLater = await self.enqueued(receivedAt=future())
        self.assertEqual(await self.store.claimDue(10, leaseSeconds=60), [])
        self.assertEqual(await self.store.retryNow(first.notification_id), 1)
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(delivery.notification, first)
        self.assertEqual(await self.store.retryNow(first.notification_id), 0)  # in flight
        self.assertEqual(await self.store.retryNow(self.store.nextNotificationId()), 0)
        self.assertEqual(await self.store.retryNow("not-an-id"), 0)
        self.assertEqual(await self.store.retryNow(None), 2)
        claimed = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual({d.notification for d in claimed}, {second, queuedLater})

    async def test_deleteQueued(self) -> None:
        notification = await self.enqueued(recipients=(ALICE, PHONE, BOB))
        nid = notification.notification_id
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        await self.store.recordOutcome(
            nid, delivery.lease, [self.event(notification, ALICE, "CH_SENT")], [ALICE], None
        )
        at = T0 + timedelta(hours=1)
        failed = await self.store.deleteQueued(nid, "deleted by an operator", at)
        self.assertEqual(failed, [PHONE, BOB])
        trail = await self.store.statusTrail(nid)
        self.assertEqual(
            [
                (e.recipient, e.status_code, e.status_text, e.timestamp)
                for e in trail
                if e.status_code == "CAAS_FAILED"
            ],
            [
                (PHONE, "CAAS_FAILED", "deleted by an operator", at),
                (BOB, "CAAS_FAILED", "deleted by an operator", at),
            ],
        )
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0))
        self.assertFalse(await self.bodyStored(nid))
        with self.assertRaises(LeaseLost):
            await self.store.recordOutcome(nid, delivery.lease, [], [PHONE, BOB], None)
        with self.assertRaises(NotFound):
            await self.store.deleteQueued(nid, "again", at)
        with self.assertRaises(NotFound):
            await self.store.deleteQueued(self.store.nextNotificationId(), "never", at)

    async def test_deleteHeld(self) -> None:
        notification = await self.enqueued(recipients=(ALICE,))
        await self.store.hold(notification.notification_id, None)
        failed = await self.store.deleteQueued(notification.notification_id, "no", T0)
        self.assertEqual(failed, [ALICE])
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0, held=0))

    async def test_queueItems(self) -> None:
        (deferred,) = await self.retries(1, future(60))
        old = await self.enqueued(receivedAt=T0)
        held = await self.enqueued(receivedAt=T0 + timedelta(seconds=5), account="other")
        await self.store.hold(held.notification_id, None)
        later = await self.enqueued(receivedAt=future(7200), recipients=(PHONE,))
        items = await self.store.queueItems(None, None, 10)
        self.assertEqual(
            [(i.notification_id, i.state) for i in items],
            [
                (old.notification_id, "queued"),
                (held.notification_id, "held"),
                (deferred.notification_id, "deferred"),
                (later.notification_id, "queued"),
            ],
        )
        first = items[0]
        self.assertIsInstance(first, QueueItem)
        self.assertEqual(
            (first.account, first.sender, first.attempts, first.pending, first.size),
            ("acme", old.sender, 0, old.recipients, old.size),
        )
        self.assertEqual((first.received_at, first.next_attempt), (T0, T0))
        self.assertEqual(items[1].account, "other")
        self.assertEqual(items[2].attempts, 1)
        self.assertEqual(await self.store.queueItem(later.notification_id), items[3])
        self.assertEqual(await self.store.queueItems(None, None, 2), items[:2])
        self.assertEqual(await self.store.queueItems("queued", None, 10), [items[0], items[3]])
        self.assertEqual(await self.store.queueItems("held", None, 10), [items[1]])
        self.assertEqual(await self.store.queueItems(None, "other", 10), [items[1]])
        self.assertEqual(await self.store.queueItems("queued", "other", 10), [])
        self.assertEqual(await self.store.queueItems("in_flight", None, 10), [])
        self.assertIsNone(await self.store.queueItem(self.store.nextNotificationId()))
        self.assertIsNone(await self.store.queueItem("not-an-id"))

    async def test_expireKeepsEveryQueueState(self) -> None:
        """Only notifications out of the queue expire: never queued, deferred, in-flight or
        held ones, however old."""
        kept = [await self.enqueued(receivedAt=T0) for _ in range(4)]
        finished = await self.enqueued(receivedAt=T0)
        await self.finishDelivery(finished.notification_id)
        deliveries = await self.store.claimDue(10, leaseSeconds=60)
        for delivery in deliveries[1:]:
            nid = delivery.notification.notification_id
            await self.store.recordOutcome(nid, delivery.lease, [], [], future())
        await self.store.hold(kept[3].notification_id, None)
        stats = await self.store.stats()
        self.assertEqual(stats, QueueStats(0, 2, 1, held=1))
        self.assertEqual(await self.store.expire(T0 + timedelta(days=30)), 1)
        self.assertIsNone(await self.store.getNotification(finished.notification_id))
        for notification in kept:
            nid = notification.notification_id
            self.assertEqual(await self.store.getNotification(nid), notification)
            self.assertTrue(await self.bodyStored(nid))
        self.assertEqual(await self.store.stats(), stats)

    async def test_dkimKeys(self) -> None:
        self.assertIsNone(await self.store.getDkimKey("example.com"))
        self.assertEqual(await self.store.listDkimKeys(), [])
        first = DkimKey("example.com", "s1", "rsa", b"-----BEGIN PRIVATE KEY-----\nAAA\n", T0)
        other = DkimKey("acme.example", "mail", "ed25519", b"\x00\xffkey", T0)
        await self.store.putDkimKey(first)
        await self.store.putDkimKey(other)
        self.assertEqual(await self.store.getDkimKey("example.com"), first)
        self.assertEqual(await self.store.listDkimKeys(), [other, first])
        replaced = dataclasses.replace(
            first, selector="s2", private_key=b"new", created_at=T0 + timedelta(1)
        )
        await self.store.putDkimKey(replaced)
        self.assertEqual(await self.store.getDkimKey("example.com"), replaced)
        self.assertEqual(await self.store.listDkimKeys(), [other, replaced])
        self.assertTrue(await self.store.removeDkimKey("example.com"))
        self.assertFalse(await self.store.removeDkimKey("example.com"))
        self.assertIsNone(await self.store.getDkimKey("example.com"))
        self.assertEqual(await self.store.listDkimKeys(), [other])
        self.assertNotIn("PRIVATE", repr(first))
        self.assertNotIn("new", repr(replaced))

    async def test_messageInPieces(self) -> None:
        """A message handed over in pieces (a new header, a view of the body) is stored as
        the pieces joined."""
        notification = self.notification(receivedAt=past())
        arrived = b"xxFrom: a@example.com\r\n\r\nhello\r\n"
        await self.store.enqueue(notification, (b"Received: by x\r\n", memoryview(arrived)[2:]))
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(delivery.message, b"Received: by x\r\n" + arrived[2:])

    async def test_claimNotDueYet(self) -> None:
        await self.enqueued(receivedAt=future())
        self.assertEqual(await self.store.claimDue(10, leaseSeconds=60), [])
        self.assertEqual(await self.store.claimDue(0, leaseSeconds=60), [])

    async def test_claimOldestDueFirst(self) -> None:
        later = await self.enqueued(receivedAt=T0 + timedelta(seconds=1))
        first = await self.enqueued(receivedAt=T0)
        sameTime = await self.enqueued(receivedAt=T0)
        await self.enqueued(receivedAt=future())  # not due
        claimed = await self.store.claimDue(2, leaseSeconds=60)
        # Equal times: the smaller id first.
        self.assertEqual([d.notification for d in claimed], [first, sameTime])
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        self.assertEqual(delivery.notification, later)

    async def test_eventsForUnknownNotification(self) -> None:
        known = await self.enqueued(recipients=(ALICE,))
        events = [
            StatusEvent(known.notification_id, ALICE, "CH_SENT", "Successful", T0),
            StatusEvent(self.store.nextNotificationId(), PHONE, "CH_SENT", "Successful", T0),
        ]
        with self.assertRaises(NotFound):
            await self.store.addEvents(events)
        self.assertEqual(len(await self.store.statusTrail(known.notification_id)), 1)

    async def test_recordEventsOfAnotherNotification(self) -> None:
        notification = await self.enqueued(recipients=(ALICE,))
        other = await self.enqueued(recipients=(ALICE,))
        (delivery,) = await self.store.claimDue(1, leaseSeconds=60)
        self.assertEqual(delivery.notification, notification)
        with self.assertRaises(StoreError):
            await self.store.recordOutcome(
                notification.notification_id,
                delivery.lease,
                [self.event(other, ALICE, "CH_SENT")],
                [ALICE],
                None,
            )
        self.assertEqual((await self.store.stats()).in_flight, 1)

    async def test_expireAfterFinish(self) -> None:
        notification = await self.enqueued(receivedAt=T0)
        await self.finishDelivery(notification.notification_id)
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


class ReportQueueTestsMixin:
    """IReportQueue: reports written with the outcome they report, claimed under a lease,
    retried or dropped, their attempts listed; webhook secrets and shared keys."""

    store: Any

    def report(self, notification: Notification, n: int = 0) -> Any:
        return pendingReport(notification, n)

    async def test_reportsWithTheOutcome(self) -> None:
        """recordOutcome writes the reports with the events; a stale lease writes neither."""
        notification = await self.enqueued(recipients=(ALICE,))
        nid = notification.notification_id
        (stale,) = await self.store.claimDue(10, leaseSeconds=0)
        (delivery,) = await self.store.claimDue(10, leaseSeconds=60)
        event = StatusEvent(nid, ALICE, "CH_SENT", "Successful", past(0))
        report = self.report(notification)
        with self.assertRaises(LeaseLost):
            await self.store.recordOutcome(nid, stale.lease, [event], [ALICE], None, [report])
        self.assertEqual(await self.store.pendingReports(), 0)
        await self.store.recordOutcome(nid, delivery.lease, [event], [ALICE], None, [report])
        self.assertEqual(await self.store.pendingReports(), 1)
        (claimed,) = await self.store.claimReports(10, 60)
        self.assertEqual((claimed.report, claimed.attempts), (report, 0))
        self.assertEqual(await self.store.claimReports(10, 60), [])  # leased

    async def test_retryThenSent(self) -> None:
        from mailrelay.model import ReportAttempt

        notification = await self.enqueued(recipients=(ALICE,))
        nid = notification.notification_id
        event = StatusEvent(nid, ALICE, "OPENED", "Opened", past(0))
        reports = [self.report(notification, 0), self.report(notification, 1)]
        await self.store.addEventsWithReports([event], reports)
        self.assertEqual((await self.store.statusTrail(nid))[-1], event)
        claims = await self.store.claimReports(10, 60)
        self.assertEqual(len(claims), 2)
        pairs = [(c.report.report_id, c.lease) for c in claims]
        failed = ReportAttempt(nid, "", "acme.example", 500, "retry", past(0))
        self.assertEqual(await self.store.recordReportAttempt(pairs, failed, past(0)), 2)
        self.assertEqual(await self.store.recordReportAttempt(pairs, failed, past(0)), 0)
        again = await self.store.claimReports(10, 60)
        self.assertEqual([c.attempts for c in again], [1, 1])
        sent = ReportAttempt(nid, "", "acme.example", 200, "sent", past(0))
        done = [(c.report.report_id, c.lease) for c in again]
        self.assertEqual(await self.store.recordReportAttempt(done, sent, None), 2)
        self.assertEqual(await self.store.pendingReports(), 0)
        attempts = await self.store.reportAttempts(nid)
        self.assertEqual(
            [(a.code, a.outcome) for a in attempts], [(500, "retry")] * 2 + [(200, "sent")] * 2
        )
        self.assertEqual({a.report_id for a in attempts}, {r.report_id for r in reports})
        self.assertEqual({a.notification_id for a in attempts}, {nid})

    async def test_notDueUntilLater(self) -> None:
        notification = await self.enqueued(recipients=(ALICE,))
        await self.store.addEventsWithReports([], [self.report(notification)])
        (claim,) = await self.store.claimReports(10, 60)
        pair = [(claim.report.report_id, claim.lease)]
        await self.store.recordReportAttempt(pair, None, future())
        self.assertEqual(await self.store.claimReports(10, 60), [])
        self.assertEqual(await self.store.pendingReports(), 1)

    async def test_releasedClaimDueAtOnceUncounted(self) -> None:
        notification = await self.enqueued(recipients=(ALICE,))
        await self.store.addEventsWithReports([], [self.report(notification)])
        (claim,) = await self.store.claimReports(10, 60)
        await self.store.recordReportAttempt([(claim.report.report_id, claim.lease)], None, None)
        (again,) = await self.store.claimReports(10, 60)
        self.assertEqual(again.attempts, 0)
        self.assertEqual(await self.store.reportAttempts(notification.notification_id), [])

    async def test_lapsedLeaseDueAgain(self) -> None:
        notification = await self.enqueued(recipients=(ALICE,))
        await self.store.addEventsWithReports([], [self.report(notification)])
        (first,) = await self.store.claimReports(10, 0)
        (second,) = await self.store.claimReports(10, 60)
        self.assertNotEqual(first.lease, second.lease)

    async def test_reportsForUnknownNotification(self) -> None:
        unknown = dataclasses.replace(self.notification(), notification_id="1234")
        with self.assertRaises(NotFound):
            await self.store.addEventsWithReports([], [self.report(unknown)])
        self.assertEqual(await self.store.pendingReports(), 0)

    async def test_gone(self) -> None:
        self.assertFalse(await self.store.isGone("https://a.example/x"))
        await self.store.markGone("https://a.example/x")
        self.assertTrue(await self.store.isGone("https://a.example/x"))
        self.assertFalse(await self.store.isGone("https://a.example/y"))

    async def test_webhookSecrets(self) -> None:
        await self.store.addAccount("acme", "hash")
        self.assertEqual(await self.store.webhookSecrets("acme"), ())
        await self.store.setWebhookSecrets("acme", ["whsec_b", "whsec_a"])
        self.assertEqual(await self.store.webhookSecrets("acme"), ("whsec_b", "whsec_a"))
        with self.assertRaises(NotFound):
            await self.store.setWebhookSecrets("nobody", ["whsec_c"])

    async def test_sharedKeyMadeOnce(self) -> None:
        first = await self.store.sharedKey("tracking", b"\x00\xffone")
        self.assertEqual(first, b"\x00\xffone")
        self.assertEqual(await self.store.sharedKey("tracking", b"two"), first)


class GatewayIdsTestsMixin:
    """IGatewayIds: the SMS gateways' ids of the parts of a text, settled one by one (or all
    at once by a failure) in one atomic step each, forgotten past their time."""

    store: Any

    async def sentText(self, ids: list[str], recipient: Recipient = PHONE) -> str:
        notification = await self.enqueued(recipients=(recipient,))
        nid: str = notification.notification_id
        await self.store.rememberGatewayIds(nid, recipient, ids, future(3 * 86400))
        return nid

    async def test_partsDeliveredOneByOne(self) -> None:
        nid = await self.sentText(["m3", "m1", "m2"])
        self.assertEqual(await self.store.lookupGatewayId("m2"), (nid, PHONE, ("m1", "m2", "m3")))
        self.assertFalse(await self.store.settleGatewayId("m1"))
        self.assertEqual(await self.store.lookupGatewayId("m3"), (nid, PHONE, ("m2", "m3")))
        self.assertIsNone(await self.store.lookupGatewayId("m1"))
        self.assertFalse(await self.store.settleGatewayId("m1"))  # a receipt repeated
        self.assertFalse(await self.store.settleGatewayId("m2"))
        self.assertTrue(await self.store.settleGatewayId("m3"))
        self.assertIsNone(await self.store.lookupGatewayId("m3"))
        self.assertFalse(await self.store.settleGatewayId("m3"))

    async def test_onePartFailedSettlesTheText(self) -> None:
        nid = await self.sentText(["a1", "a2"])
        other = await self.sentText(["b1"], Recipient("+393331234567", "sms"))
        self.assertTrue(await self.store.settleGatewayId("a1", delivered=False))
        self.assertIsNone(await self.store.lookupGatewayId("a2"))
        self.assertFalse(await self.store.settleGatewayId("a2", delivered=False))
        self.assertFalse(await self.store.settleGatewayId("a2"))
        self.assertNotEqual(nid, other)
        self.assertEqual(
            await self.store.lookupGatewayId("b1"),
            (other, Recipient("+393331234567", "sms"), ("b1",)),
        )

    async def test_settledOnceWhenReceiptsRace(self) -> None:
        """Two relays settling the last parts at once: exactly one of them settles the
        text; a failure racing a delivery likewise."""
        await self.sentText(["r1", "r2"])
        settled = await gatherResults(
            [self.store.settleGatewayId("r1"), self.store.settleGatewayId("r2")]
        )
        self.assertEqual(sorted(settled), [False, True])
        await self.sentText(["f1", "f2"])
        settled = await gatherResults(
            [
                self.store.settleGatewayId("f1", delivered=False),
                self.store.settleGatewayId("f2"),
            ]
        )
        self.assertEqual(settled.count(True), 1)

    async def test_pastTheirTime(self) -> None:
        notification = await self.enqueued(recipients=(PHONE,))
        nid = notification.notification_id
        await self.store.rememberGatewayIds(nid, PHONE, ["late"], past(1))
        self.assertIsNone(await self.store.lookupGatewayId("late"))
        self.assertFalse(await self.store.settleGatewayId("late"))
        await self.store.expire(T0)  # forgets what is past its time; nothing else
        self.assertEqual(await self.store.getNotification(nid), notification)

    async def test_idTakenOverByAnotherText(self) -> None:
        """An id given again (a gateway restarting its numbering) belongs to the newer text."""
        first = await self.sentText(["x1", "x2"])
        second = await self.sentText(["x2"], Recipient("+393331234567", "sms"))
        self.assertEqual(await self.store.lookupGatewayId("x1"), (first, PHONE, ("x1",)))
        self.assertEqual(
            await self.store.lookupGatewayId("x2"),
            (second, Recipient("+393331234567", "sms"), ("x2",)),
        )
        self.assertTrue(await self.store.settleGatewayId("x1"))

    async def test_unknownNotification(self) -> None:
        unknown = self.store.nextNotificationId()
        with self.assertRaises(NotFound):
            await self.store.rememberGatewayIds(unknown, PHONE, ["u1"], future())
        self.assertIsNone(await self.store.lookupGatewayId("u1"))
        self.assertIsNone(await self.store.lookupGatewayId("never"))
