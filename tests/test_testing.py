"""
Tests for mailrelay.testing: the in-memory store passes the suite every store backend passes,
answering at once; the fake avatar and portal log in and keep what they are given.

Of the shared suite, RememberedAccountDataTestsMixin is not run: it checks that a second
store over the same data remembers account data for a while, and the in-memory store has
neither a second store over its data nor anything remembered.
"""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailrelay.auth.secrets import verifyPassword
from mailrelay.interfaces import IStore, ISubmission, StoreError
from mailrelay.model import Notification, Recipient, SessionInfo
from mailrelay.testing import (
    FakeSubmission,
    MemoryStore,
    SynchronousReactor,
    SynchronousThreadPool,
    cheapPasswordHash,
    fakePortal,
)
from tests.store_mixin import (
    ALICE,
    T0,
    DeliveryQueueTestsMixin,
    GatewayIdsTestsMixin,
    ReportQueueTestsMixin,
    StoreHelpersMixin,
    StoreTestsMixin,
)


class MemoryStoreTestsBase(StoreHelpersMixin, TestCase):
    """An in-memory store whose clock stands at the reactor's time (the shared suite's
    ``past()`` and ``future()`` read the reactor) and moves only when a test moves it."""

    def makeStore(self) -> MemoryStore:
        self.clock = Clock()
        self.clock.advance(reactor.seconds())
        store = MemoryStore(self.clock)
        self.addCleanup(store.close)
        return store

    async def bodyStored(self, notificationId: str) -> bool:
        return bool(self.store.hasMessage(notificationId))


class MemoryStoreTests(StoreTestsMixin, MemoryStoreTestsBase):
    """The shared suite, against the in-memory store."""


class MemoryDeliveryQueueTests(DeliveryQueueTestsMixin, MemoryStoreTestsBase):
    pass


class MemoryReportQueueTests(ReportQueueTestsMixin, MemoryStoreTestsBase):
    pass


class MemoryGatewayIdsTests(GatewayIdsTestsMixin, MemoryStoreTestsBase):
    pass


class MemoryStoreOwnTests(SynchronousTestCase):
    """What only the in-memory store promises: answers at once, and a store that waits."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock)

    def test_providesIStore(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))

    def test_answersAtOnce(self) -> None:
        account = self.successResultOf(self.store.addAccount("acme", "h"))
        self.assertEqual(self.successResultOf(self.store.getAccount("acme")), account)

    def test_clockTellsTheTime(self) -> None:
        self.clock.advance(1000)
        self.successResultOf(self.store.addAccount("acme", "h"))
        key = self.successResultOf(self.store.addApiKey("acme", "k1", "a" * 64))
        self.assertEqual(key.created_at.timestamp(), 1000)

    def test_closedStoreFails(self) -> None:
        self.successResultOf(self.store.close())
        self.failureResultOf(self.store.getAccount("acme"), StoreError)
        self.failureResultOf(self.store.stats(), StoreError)

    def test_heldEnqueuesWait(self) -> None:
        notification = Notification(
            notification_id=self.store.nextNotificationId(),
            account="acme",
            sender="app@acme.example",
            recipients=(ALICE,),
            size=10,
            received_at=T0,
        )
        self.store.holdEnqueues()
        d = self.store.enqueue(notification, b"body")
        self.assertNoResult(d)
        nid = notification.notification_id
        self.assertIsNone(self.successResultOf(self.store.getNotification(nid)))
        self.assertEqual(self.successResultOf(self.store.stats()).queued, 0)
        self.store.releaseEnqueues()
        self.successResultOf(d)
        self.assertEqual(self.successResultOf(self.store.stats()).queued, 1)


class FakeSubmissionTests(SynchronousTestCase):
    def test_loginAndSubmit(self) -> None:
        avatar = FakeSubmission()
        self.assertTrue(verifyObject(ISubmission, avatar))
        portal = fakePortal(avatar, {"acme": "secret"})
        login = portal.login(UsernamePassword(b"acme", b"secret"), None, ISubmission)
        interface, got, _ = self.successResultOf(login)
        self.assertEqual((interface, got), (ISubmission, avatar))
        wrong = portal.login(UsernamePassword(b"acme", b"wrong"), None, ISubmission)
        self.failureResultOf(wrong, UnauthorizedLogin)

        session = SessionInfo(client_address="192.0.2.7", listener="test")
        sender = avatar.validateFrom(session, "app@acme.example")
        recipient = avatar.validateTo(session, sender, "a@example.org", [])
        self.assertEqual(recipient, Recipient("a@example.org", "email"))
        nid = self.successResultOf(avatar.acceptMessage(session, sender, [recipient], b"x"))
        self.assertEqual(avatar.messages, [("app@acme.example", (recipient,), b"x")])
        self.assertEqual(nid, "1")

    def test_refusal(self) -> None:
        avatar = FakeSubmission()
        avatar.refusal = ValueError("no")
        session = SessionInfo(client_address="192.0.2.7", listener="test")
        self.assertRaises(ValueError, avatar.validateFrom, session, "app@acme.example")


class SynchronousThreadsTests(SynchronousTestCase):
    def test_deferToThreadPoolAnswersAtOnce(self) -> None:
        d = deferToThreadPool(SynchronousReactor(), SynchronousThreadPool(), lambda: 42)
        self.assertEqual(self.successResultOf(d), 42)
        failing = deferToThreadPool(SynchronousReactor(), SynchronousThreadPool(), lambda: 1 / 0)
        self.failureResultOf(failing, ZeroDivisionError)

    def test_cheapPasswordHashVerifies(self) -> None:
        passwordHash = cheapPasswordHash("secret")
        self.assertTrue(passwordHash.startswith("$argon2id$"))
        self.assertTrue(verifyPassword(passwordHash, "secret"))
        self.assertFalse(verifyPassword(passwordHash, "wrong"))
