"""
The receipt book over a real SQLite store: receipts that come before the submit outcome is
written wait for it, a text's parts settle in the store (so a second book, another relay's or
the next one's, finds and completes them), and receipts for ids nobody gave change nothing.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.delivery.sms.receipts import Receipt, ReceiptBook
from mailrelay.store.sqlite import SQLiteStore
from tests.store_mixin import PHONE, T0, StoreHelpersMixin


class ReceiptBookTests(StoreHelpersMixin, TestCase):
    async def makeStore(self) -> SQLiteStore:
        directory = Path(self.mktemp())
        directory.mkdir()
        store = SQLiteStore(directory / "mailrelay.sqlite3", reactor)
        await store.open()
        self.addCleanup(store.close)
        return store

    async def codes(self, nid: str) -> list[str]:
        return [e.status_code for e in await self.store.statusTrail(nid)]

    async def test_earlyReceiptWaitsForRelease(self) -> None:
        notification = await self.enqueued(recipients=(PHONE,), receivedAt=T0)
        nid = notification.notification_id
        book = ReceiptBook(self.store, reactor)
        await book.expect(("p1", "p2"), nid, PHONE)
        self.assertIsNone(book.receive(Receipt("p1", "DELIVRD")))
        self.assertIsNone(book.receive(Receipt("p2", "ENROUTE")))  # not final
        self.assertIsNone(book.receive(Receipt("p2", "DELIVRD")))
        self.assertEqual(await self.codes(nid), ["CAAS_RECEIVED"])
        await book.release(nid)
        self.assertEqual(await self.codes(nid), ["CAAS_RECEIVED", "CH_SENT"])
        self.assertEqual(book.recorded, 1)
        self.assertIsNone(await self.store.lookupGatewayId("p1"))

    async def test_anotherBookCompletesTheText(self) -> None:
        """The book of the relay that sent the text settles one part; a new book (a restart)
        learns the text from the store and fails it with the other part's receipt."""
        notification = await self.enqueued(recipients=(PHONE,), receivedAt=T0)
        nid = notification.notification_id
        sender = ReceiptBook(self.store, reactor)
        await sender.expect(("q1", "q2"), nid, PHONE)
        await sender.release(nid)
        await sender.receive(Receipt("q1", "DELIVRD"))
        restarted = ReceiptBook(self.store, reactor)
        await restarted.receive(Receipt("q2", "UNDELIV", "005"))
        trail = await self.store.statusTrail(nid)
        self.assertEqual([e.status_code for e in trail], ["CAAS_RECEIVED", "CH_FAILED"])
        self.assertEqual(trail[-1].status_text, "delivery receipt: UNDELIV err:005")
        await restarted.receive(Receipt("q2", "UNDELIV"))  # repeated: nothing more
        await sender.receive(Receipt("q2", "DELIVRD"))  # the sender's memory is stale
        self.assertEqual(await self.codes(nid), ["CAAS_RECEIVED", "CH_FAILED"])

    async def test_unknownId(self) -> None:
        book = ReceiptBook(self.store, reactor)
        await book.receive(Receipt("nobody-gave-this", "DELIVRD"))
        self.assertEqual((book.unknown, book.recorded), (1, 0))
