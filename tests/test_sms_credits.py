"""
Prepaid SMS credits (SPEC §8.3): taken in the same write as the enqueue, on both backends;
two sessions racing for the last credits cannot both have them; a message they do not cover
gets ``452 4.2.2`` at the end of DATA and nothing is stored.
"""

from __future__ import annotations

import dataclasses

from twisted.internet.defer import DeferredList
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailrelay.interfaces import InsufficientCredits
from mailrelay.model import Sender
from tests.relay_fixture import ACCOUNT, startRelay
from tests.smsc_simulator import startSmsc
from tests.test_sms_e2e import SENDER_NUMBER, session, smsConfig
from tests.test_store_redis import RedisStoreTestsBase
from tests.test_store_sqlite import SQLiteStoreTestsBase


class CreditsMixin:
    store: object

    async def account(self, credits: int | None) -> None:
        store = self.store
        account = await store.addAccount("acme", "x")  # type: ignore[attr-defined]
        await store.updateAccount(dataclasses.replace(account, sms_credits=credits))  # type: ignore[attr-defined]

    async def test_takenWithTheEnqueue(self) -> None:
        await self.account(5)
        notification = self.notification()  # type: ignore[attr-defined]
        await self.store.enqueue(notification, b"m", smsCredits=3)  # type: ignore[attr-defined]
        self.assertEqual((await self.store.getAccount("acme")).sms_credits, 2)  # type: ignore[attr-defined]
        other = self.notification()  # type: ignore[attr-defined]
        with self.assertRaises(InsufficientCredits):  # type: ignore[attr-defined]
            await self.store.enqueue(other, b"m", smsCredits=3)  # type: ignore[attr-defined]
        self.assertIsNone(await self.store.getNotification(other.notification_id))  # type: ignore[attr-defined]
        self.assertEqual((await self.store.getAccount("acme")).sms_credits, 2)  # type: ignore[attr-defined]

    async def test_race(self) -> None:
        """Ten messages of one credit race for five credits: five are stored."""
        await self.account(5)
        notifications = [self.notification() for _ in range(10)]  # type: ignore[attr-defined]
        results = await DeferredList(
            [self.store.enqueue(n, b"m", smsCredits=1) for n in notifications],  # type: ignore[attr-defined]
            consumeErrors=True,
        )
        stored = [ok for ok, _ in results]
        self.assertEqual(stored.count(True), 5)
        for (ok, value), _ in zip(results, notifications, strict=True):
            if not ok:
                self.assertTrue(value.check(InsufficientCredits))
        self.assertEqual((await self.store.getAccount("acme")).sms_credits, 0)  # type: ignore[attr-defined]
        self.assertEqual((await self.store.stats()).queued, 5)  # type: ignore[attr-defined]

    async def test_noLimit(self) -> None:
        await self.account(None)
        await self.store.enqueue(self.notification(), b"m", smsCredits=4)  # type: ignore[attr-defined]
        self.assertIsNone((await self.store.getAccount("acme")).sms_credits)  # type: ignore[attr-defined]


class SQLiteCreditsTests(CreditsMixin, SQLiteStoreTestsBase):
    pass


class RedisCreditsTests(CreditsMixin, RedisStoreTestsBase):
    pass


class CreditsOverSmtpTests(TestCase):
    timeout = 60

    async def test_exhausted452NothingStored(self) -> None:
        smsc = await startSmsc(self)
        relay = await startRelay(self, extra=smsConfig(smsc))
        await relay.updateAccount(
            sms_enabled=True, networks=("127.0.0.0/8",), sms_segments=2, sms_credits=3
        )
        await relay.store.addSender(Sender(ACCOUNT, SENDER_NUMBER, "sms"))
        port = relay.ports["network"]
        first = await deferToThread(session, port, b"a" * 200 + b"\r\n", None, False)
        self.assertTrue(first[-1].startswith("250 2.0.0"), first)
        # 2 credits taken, 1 left: a two-part text is refused, nothing stored.
        second = await deferToThread(session, port, b"b" * 200 + b"\r\n", None, False)
        self.assertTrue(second[-1].startswith("452 4.2.2"), second)
        third = await deferToThread(session, port, b"one part\r\n", None, False)
        self.assertTrue(third[-1].startswith("250 2.0.0"), third)
        self.assertEqual((await relay.store.getAccount(ACCOUNT)).sms_credits, 0)
        stats = await relay.store.stats()
        self.assertLessEqual(stats.queued + stats.deferred + stats.in_flight, 2)
