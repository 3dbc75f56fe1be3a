"""
Tests for ``mailrelay queue ...``: listing, showing, retrying, holding, releasing and deleting
entries of the delivery queue, against a real SQLite store in the test's data_dir. Entries are
put in the queue, claimed and deferred through the store API, as the relay's delivery workers
would.
"""

from __future__ import annotations

from datetime import timedelta

from twisted.internet.defer import gatherResults

from mailrelay.model import Notification, Recipient, StatusEvent, utcnow
from mailrelay.store.sqlite import SQLiteStore
from tests.store_mixin import ALICE, BOB, BODY, PHONE, T0
from tests.test_cli import CLITestsBase

LATER = utcnow() + timedelta(hours=1)
"""A next attempt that has not come during a test."""


class QueueTestsBase(CLITestsBase):
    async def enqueue(
        self,
        store: SQLiteStore,
        account: str = "acme",
        recipients: tuple[Recipient, ...] = (ALICE, PHONE),
    ) -> str:
        notification = Notification(
            notification_id=store.nextNotificationId(),
            account=account,
            sender="app@acme.example",
            recipients=recipients,
            size=len(BODY),
            received_at=T0,
        )
        await store.enqueue(notification, BODY)
        return notification.notification_id

    async def deferred(self, store: SQLiteStore, delivered: Recipient | None = None) -> str:
        """A notification tried once: ``delivered`` got through, the others deferred."""
        nid = await self.enqueue(store, recipients=(ALICE, BOB))
        claimed = [
            d for d in await store.claimDue(10, 300) if d.notification.notification_id == nid
        ]
        self.assertEqual(len(claimed), 1)
        events = [
            StatusEvent(
                nid,
                recipient,
                "CH_SENT" if recipient == delivered else "CH_DEFERRED",
                "mx.customer.com: 451 4.7.1 try later",
                T0 + timedelta(minutes=1),
            )
            for recipient in claimed[0].pending
        ]
        finished = [delivered] if delivered else []
        await store.recordOutcome(nid, claimed[0].lease, events, finished, LATER)
        return nid

    async def stateOf(self, nid: str) -> str | None:
        """The entry's state as a fresh store (another process's view) sees it."""
        item = await (await self.openStore()).queueItem(nid)
        return None if item is None else item.state


class ListShowTests(QueueTestsBase):
    async def test_list(self) -> None:
        await self.addAccount("acme")
        await self.addAccount("beta")
        store = await self.openStore()
        deferred = await self.deferred(store, delivered=BOB)
        queued = await self.enqueue(store)
        other = await self.enqueue(store, account="beta", recipients=(PHONE,))
        human, document, onlyDeferred, onlyBeta, limited, empty = await gatherResults(
            [
                self.ok("queue", "list"),
                self.ok("queue", "list", "--json"),
                self.ok("queue", "list", "--state", "deferred", "--json"),
                self.ok("queue", "list", "--account", "beta", "--json"),
                self.ok("queue", "list", "--limit", "1", "--json"),
                self.ok("queue", "list", "--state", "held"),
            ]
        )
        lines = human.out.splitlines()
        self.assertEqual(
            lines[0].split(),
            ["ID", "STATE", "ACCOUNT", "NEXT", "ATTEMPT", "(UTC)", "ATTEMPTS", "PENDING"],
        )
        # By next attempt, oldest first: the two never tried (due since T0), then the retry.
        self.assertEqual([line.split()[0] for line in lines[1:]], [queued, other, deferred])
        self.assertEqual(lines[3].split()[:3], [deferred, "deferred", "acme"])
        self.assertEqual(lines[3].split()[-2:], ["1", "1"])

        entries = document.json()
        self.assertEqual(len(entries), 3)
        self.assertEqual(
            entries[0],
            {
                "notification_id": queued,
                "account": "acme",
                "sender": "app@acme.example",
                "state": "queued",
                "next_attempt": entries[0]["next_attempt"],
                "attempts": 0,
                "pending": ["email:name1@customer.com", "sms:+4477331234567"],
                "received_at": "2015-03-08 14:58:30.252",
                "size": len(BODY),
            },
        )
        self.assertEqual(entries[2]["state"], "deferred")
        self.assertEqual(entries[2]["pending"], ["email:name1@customer.com"])
        self.assertEqual(entries[2]["attempts"], 1)
        self.assertEqual([e["notification_id"] for e in onlyDeferred.json()], [deferred])
        self.assertEqual([e["notification_id"] for e in onlyBeta.json()], [other])
        self.assertEqual(len(limited.json()), 1)
        self.assertEqual(empty.out, "no held entries\n")

    async def test_listEmptyAndRefused(self) -> None:
        await self.addAccount("acme")
        empty, emptyJson, badState, badLimit, unknownAccount = await gatherResults(
            [
                self.ok("queue", "list"),
                self.ok("queue", "list", "--json"),
                self.mailrelay("queue", "list", "--state", "failed"),
                self.mailrelay("queue", "list", "--limit", "0"),
                self.mailrelay("queue", "list", "--account", "nobody"),
            ]
        )
        self.assertEqual(empty.out, "the queue is empty\n")
        self.assertEqual(emptyJson.json(), [])
        self.assertOneLineError(badState, "failed", code=2)
        self.assertOneLineError(badLimit, "greater than 0", code=2)
        self.assertOneLineError(unknownAccount, "unknown account: nobody", code=1)

    async def test_show(self) -> None:
        store = await self.openStore()
        nid = await self.deferred(store, delivered=BOB)
        unknownId = store.nextNotificationId()
        human, document, unknown, unknownJson, notAnId = await gatherResults(
            [
                self.ok("queue", "show", nid),
                self.ok("queue", "show", nid, "--json"),
                self.mailrelay("queue", "show", unknownId),
                self.mailrelay("queue", "show", unknownId, "--json"),
                self.mailrelay("queue", "show", "no-such-id"),
            ]
        )
        shown = document.json()
        self.assertEqual(shown["notification_id"], nid)
        self.assertEqual(shown["state"], "deferred")
        self.assertEqual(shown["attempts"], 1)
        self.assertEqual(shown["pending"], ["email:name1@customer.com"])
        self.assertEqual(
            [(e["recipient"], e["statusCode"]) for e in shown["status"]],
            [
                ("email:name1@customer.com", "CAAS_RECEIVED"),
                ("email:name2@customer.com", "CAAS_RECEIVED"),
                ("email:name1@customer.com", "CH_DEFERRED"),
                ("email:name2@customer.com", "CH_SENT"),
            ],
        )
        self.assertIn("state:", human.out)
        self.assertIn("deferred", human.out)
        self.assertIn("pending:", human.out)
        self.assertIn("mx.customer.com: 451 4.7.1 try later", human.out)
        self.assertIn("CH_SENT", human.out)
        for result in (unknown, unknownJson, notAnId):
            self.assertOneLineError(result, "not in the queue", code=1)


class RetryTests(QueueTestsBase):
    async def test_retryOne(self) -> None:
        store = await self.openStore()
        nid = await self.deferred(store)
        other = await self.deferred(store)
        result = await self.ok("queue", "retry", nid)
        self.assertEqual(result.out, "1 queue entry due now\n")
        fresh = await self.openStore()
        item, untouched = await gatherResults([fresh.queueItem(nid), fresh.queueItem(other)])
        assert item is not None and untouched is not None
        self.assertLessEqual(item.next_attempt, utcnow())
        self.assertGreater(untouched.next_attempt, utcnow())
        claimed = await fresh.claimDue(10, 300)
        self.assertEqual([d.notification.notification_id for d in claimed], [nid])

    async def test_retryAll(self) -> None:
        store = await self.openStore()
        await self.deferred(store)
        await self.deferred(store)
        await self.enqueue(store)
        result = await self.ok("queue", "retry", "--all")
        self.assertEqual(result.out, "3 queue entries due now\n")
        claimed = await (await self.openStore()).claimDue(10, 300)
        self.assertEqual(len(claimed), 3)

    async def test_retryRefused(self) -> None:
        store = await self.openStore()
        held = await self.deferred(store)
        await self.ok("queue", "hold", held)
        inFlight = await self.enqueue(store)
        await store.claimDue(10, 300)
        neither, both, unknown, heldResult, inFlightResult = await gatherResults(
            [
                self.mailrelay("queue", "retry"),
                self.mailrelay("queue", "retry", held, "--all"),
                self.mailrelay("queue", "retry", store.nextNotificationId()),
                self.mailrelay("queue", "retry", held),
                self.mailrelay("queue", "retry", inFlight),
            ]
        )
        self.assertOneLineError(neither, "queue retry", "ID --all", code=2)
        self.assertOneLineError(both, "not allowed with", code=2)
        self.assertOneLineError(unknown, "not in the queue", code=1)
        self.assertOneLineError(heldResult, "is held", "release", code=1)
        self.assertOneLineError(inFlightResult, "in flight", code=1)
        self.assertEqual(await self.stateOf(held), "held")


class HoldReleaseTests(QueueTestsBase):
    async def test_holdAndReleaseOne(self) -> None:
        store = await self.openStore()
        nid = await self.enqueue(store)
        other = await self.enqueue(store)
        held = await self.ok("queue", "hold", nid)
        self.assertEqual(held.out, "1 queue entry held\n")
        self.assertEqual(await self.stateOf(nid), "held")
        stats, statsJson, listed = await gatherResults(
            [
                self.ok("queue", "stats"),
                self.ok("queue", "stats", "--json"),
                self.ok("queue", "list", "--state", "held", "--json"),
            ]
        )
        self.assertEqual(statsJson.json(), {"queued": 1, "deferred": 0, "in_flight": 0, "held": 1})
        self.assertIn("held:", stats.out)
        self.assertEqual([e["notification_id"] for e in listed.json()], [nid])
        # A held entry is never claimed.
        claimed = await (await self.openStore()).claimDue(10, 300)
        self.assertEqual([d.notification.notification_id for d in claimed], [other])

        released = await self.ok("queue", "release", nid)
        self.assertEqual(released.out, "1 queue entry released, due now\n")
        self.assertEqual(await self.stateOf(nid), "queued")

    async def test_holdAndReleaseAccount(self) -> None:
        await self.addAccount("acme")
        await self.addAccount("beta")
        store = await self.openStore()
        acme = [await self.enqueue(store), await self.enqueue(store)]
        beta = await self.enqueue(store, account="beta")
        held = await self.ok("queue", "hold", "--account", "acme")
        self.assertEqual(held.out, "2 queue entries held\n")
        self.assertEqual([await self.stateOf(nid) for nid in acme], ["held", "held"])
        self.assertEqual(await self.stateOf(beta), "queued")
        await self.ok("queue", "hold", beta)

        released = await self.ok("queue", "release", "--account", "beta")
        self.assertEqual(released.out, "1 queue entry released, due now\n")
        self.assertEqual(await self.stateOf(beta), "queued")
        releasedAll = await self.ok("queue", "release", "--all")
        self.assertEqual(releasedAll.out, "2 queue entries released, due now\n")
        self.assertEqual([await self.stateOf(nid) for nid in acme], ["queued", "queued"])

    async def test_holdInFlight(self) -> None:
        """An entry in flight is held once its attempt defers it; the command says so."""
        store = await self.openStore()
        nid = await self.enqueue(store)
        await store.claimDue(10, 300)
        result = await self.ok("queue", "hold", nid)
        self.assertIn(f"notification {nid} is in flight", result.out)

    async def test_refused(self) -> None:
        await self.addAccount("acme")
        store = await self.openStore()
        unknownId = store.nextNotificationId()
        results = await gatherResults(
            [
                self.mailrelay("queue", "hold"),
                self.mailrelay("queue", "hold", "--all"),
                self.mailrelay("queue", "hold", unknownId, "--account", "acme"),
                self.mailrelay("queue", "release"),
                self.mailrelay("queue", "hold", unknownId),
                self.mailrelay("queue", "release", unknownId),
                self.mailrelay("queue", "hold", "--account", "nobody"),
                self.mailrelay("queue", "release", "--account", "nobody"),
            ]
        )
        for result in results[:4]:
            self.assertOneLineError(result, code=2)
        for result in results[4:6]:
            self.assertOneLineError(result, "not in the queue", code=1)
        for result in results[6:]:
            self.assertOneLineError(result, "unknown account: nobody", code=1)


class DeleteTests(QueueTestsBase):
    async def test_delete(self) -> None:
        store = await self.openStore()
        nid = await self.deferred(store, delivered=BOB)
        other = await self.enqueue(store)
        result = await self.ok("queue", "delete", nid)
        self.assertEqual(
            result.out, f"notification {nid} deleted: 1 recipient failed (CAAS_FAILED)\n"
        )
        fresh = await self.openStore()
        self.assertIsNone(await fresh.queueItem(nid))
        self.assertIsNotNone(await fresh.queueItem(other))
        trail = await fresh.statusTrail(nid)
        last = trail[-1]
        self.assertEqual(
            (last.recipient, last.status_code, last.status_text),
            (ALICE, "CAAS_FAILED", "deleted by an operator"),
        )
        # Only the pending recipient: the delivered one keeps CH_SENT as its last word.
        self.assertEqual([e.recipient for e in trail if e.status_code == "CAAS_FAILED"], [ALICE])
        status = await self.ok("status", nid, "--json")
        self.assertEqual(
            status.json()["SAPnotification"]["status"][-1]["statusCode"], "CAAS_FAILED"
        )

        again, unknown, missing = await gatherResults(
            [
                self.mailrelay("queue", "delete", nid),
                self.mailrelay("queue", "delete", "no-such-id"),
                self.mailrelay("queue", "delete"),
            ]
        )
        self.assertOneLineError(again, "not in the queue", code=1)
        self.assertOneLineError(unknown, "not in the queue", code=1)
        self.assertOneLineError(missing, code=2)

    async def test_deleteEveryPendingRecipient(self) -> None:
        store = await self.openStore()
        nid = await self.enqueue(store, recipients=(ALICE, BOB, PHONE))
        result = await self.ok("queue", "delete", nid)
        self.assertIn("3 recipients failed", result.out)
        trail = await (await self.openStore()).statusTrail(nid)
        failed = {e.recipient for e in trail if e.status_code == "CAAS_FAILED"}
        self.assertEqual(failed, {ALICE, BOB, PHONE})
