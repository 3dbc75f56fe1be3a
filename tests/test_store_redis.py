"""
Tests for the Redis store against a real Redis server on 127.0.0.1:6379 (skipped when none
answers there): the shared store suite, then what only the Redis store promises -- several
relays on one server, atomic enqueue, WAIT for replicas, StoreError for every failure.

Each test keeps its keys under a prefix of its own and deletes them afterwards. No mocks:
failures come from a closed port, a restricted ACL user, and a private ``redis-server``
process that is killed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.config import ConfigError, parseConfig
from mailrelay.ids import INSTANCE_BITS, SEQUENCE_BITS
from mailrelay.interfaces import AlreadyExists, StoreError
from mailrelay.model import (
    STATUS_TEXTS,
    Account,
    DkimKey,
    QueueStats,
    Recipient,
    Sender,
    StatusEvent,
)
from mailrelay.store import makeStore
from mailrelay.store.redis import RedisStore
from mailrelay.store.redis.client import RedisClient
from mailrelay.store.redis.url import RedisURL, parseRedisURL
from tests.relay_fixture import freePort
from tests.store_mixin import (
    ALICE,
    BOB,
    BODY,
    PHONE,
    T0,
    DeliveryQueueTestsMixin,
    GatewayIdsTestsMixin,
    RememberedAccountDataTestsMixin,
    ReportQueueTestsMixin,
    StoreHelpersMixin,
    StoreTestsMixin,
)

HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"


@functools.cache
def redisAnswers() -> bool:
    """Whether a Redis server answers PING on HOST:PORT (asked once per test run)."""
    try:
        with socket.create_connection((HOST, PORT), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def instanceOf(notificationId: str) -> int:
    return (int(notificationId) >> SEQUENCE_BITS) & ((1 << INSTANCE_BITS) - 1)


class RedisStoreTestsBase(StoreHelpersMixin, TestCase):
    """
    Makes Redis stores under a key prefix of the test's own (``self.store``: one), and has a
    connection of its own (:meth:`redis`) to look at the server directly.
    """

    _prefix: str | None = None
    _admin: Any = None

    @property
    def prefix(self) -> str:
        if self._prefix is None:
            self._prefix = f"mailrelay-test:{uuid.uuid4().hex}:"
            self.addCleanup(self._closeAdmin)  # cleanups run last first: after the deletion
            self.addCleanup(self._deleteKeys)
        return self._prefix

    def makeStore(self) -> Deferred[RedisStore]:
        return Deferred.fromCoroutine(self.openStore())

    async def openStore(self, url: str = URL, **kwargs: Any) -> RedisStore:
        if not redisAnswers():
            raise SkipTest(f"no redis server on {HOST}:{PORT}")
        kwargs.setdefault("keyPrefix", self.prefix)
        store = RedisStore(url, reactor, **kwargs)
        await store.open()
        self.addCleanup(store.close)
        return store

    async def redis(self, *args: Any) -> Any:
        """One command on the test's own connection to the server."""
        if self._admin is None:
            self._admin = await RedisClient(parseRedisURL(URL), 5.0, 1).probe()
        return await self._admin.execute_command(*args)

    async def storedKeys(self) -> list[str]:
        """Every key under the test's prefix."""
        found: list[str] = []
        cursor = 0
        while True:
            cursor, keys = await self.redis("SCAN", cursor, "MATCH", f"{self.prefix}*")
            found += [key.decode() for key in keys]
            cursor = int(cursor)
            if cursor == 0:
                return sorted(found)

    async def bodyStored(self, notificationId: str) -> bool:
        return bool(await self.redis("EXISTS", f"{self.prefix}body:{notificationId}"))

    async def _closeAdmin(self) -> None:
        if self._admin is not None:
            await self._admin.disconnect()

    async def _deleteKeys(self) -> None:
        keys = await self.storedKeys()
        if keys:
            await self.redis("DEL", *keys)


class AccountDataRememberedTests(RememberedAccountDataTestsMixin, RedisStoreTestsBase):
    async def openSharing(self) -> RedisStore:
        return await self.openStore()


class RedisStoreTests(StoreTestsMixin, RedisStoreTestsBase):
    """The shared suite, against Redis."""


class SharedServerTests(RedisStoreTestsBase):
    """Several stores (relays) on one server; data outlives a store."""

    async def test_instancesDiffer(self) -> None:
        first = self.store
        second = await self.openStore()
        self.assertEqual((first.instanceId, second.instanceId), (0, 1))
        ids: list[str] = []
        for _ in range(2000):
            ids += (first.nextNotificationId(), second.nextNotificationId())
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual({instanceOf(i) for i in ids[0::2]}, {0})
        self.assertEqual({instanceOf(i) for i in ids[1::2]}, {1})

    async def test_instanceNumbersWrapAt1024(self) -> None:
        await self.redis("SET", f"{self.prefix}instance", "1023")
        last = await self.openStore()
        wrapped = await self.openStore()
        # 0 is leased by this test's own store (opened first), so the wrap goes on to 1.
        self.assertEqual(self.store.instanceId, 0)
        self.assertEqual((last.instanceId, wrapped.instanceId), (1023, 1))

    async def test_leasedNumbersAreSkipped(self) -> None:
        """The counter wrapping onto a number an open store holds does not hand it out again."""
        await self.redis("SET", f"{self.prefix}instance", "1023")
        holder = await self.openStore()  # takes 1023
        await self.redis("SET", f"{self.prefix}instance", "1023")  # next INCR: 1023 again
        other = await self.openStore()
        self.assertEqual(holder.instanceId, 1023)
        # 1023 is the holder's and 0 this test's own store's: the next free one is 1.
        self.assertEqual(self.store.instanceId, 0)
        self.assertEqual(other.instanceId, 1)

    async def test_closeReleasesTheLease(self) -> None:
        store = RedisStore(URL, reactor, keyPrefix=self.prefix)
        await store.open()
        lease = f"{self.prefix}instance-lease:{store.instanceId}"
        self.assertIsNotNone(await self.redis("GET", lease))
        ttl = await self.redis("TTL", lease)
        self.assertTrue(0 < ttl <= 60, ttl)
        await store.close()
        self.assertIsNone(await self.redis("GET", lease))

    async def test_renewalKeepsOrReplacesTheLease(self) -> None:
        store = await self.openStore()
        lease = f"{self.prefix}instance-lease:{store.instanceId}"
        await self.redis("EXPIRE", lease, "5")
        await store._renewLease()  # what the LoopingCall does every LEASE_SECONDS / 3
        self.assertGreater(await self.redis("TTL", lease), 5)
        # Lost (expired and taken by another store): the store moves to a free number.
        lost = store.instanceId
        await self.redis("SET", lease, "someone else")
        await store._renewLease()
        self.assertNotEqual(store.instanceId, lost)
        self.assertNotEqual(instanceOf(store.nextNotificationId()), lost)

    async def test_explicitInstance(self) -> None:
        before = await self.redis("GET", f"{self.prefix}instance")
        store = await self.openStore(instanceId=7)
        self.assertEqual(store.instanceId, 7)
        self.assertEqual(instanceOf(store.nextNotificationId()), 7)
        self.assertEqual(await self.redis("GET", f"{self.prefix}instance"), before)

    async def test_reopen(self) -> None:
        store = RedisStore(URL, reactor, keyPrefix=self.prefix)
        await store.open()
        self.store = store
        account = await store.addAccount("acme", "h")
        account = dataclasses.replace(account, sms_enabled=True, networks=("10.0.0.0/8",))
        await store.updateAccount(account)
        key = await store.addApiKey("acme", "k1", "a" * 64)
        await store.addSender(Sender("acme", "acme.example", "domain"))
        notification = await self.enqueued(bulkId="b1")
        await store.close()

        store = await self.openStore()
        self.assertEqual(await store.getAccount("acme"), account)
        self.assertEqual(await store.findApiKey("a" * 64), key)
        self.assertEqual(
            await store.listSenders("acme"), [Sender("acme", "acme.example", "domain")]
        )
        nid = notification.notification_id
        self.assertEqual(await store.getNotification(nid), notification)
        self.assertEqual(len(await store.statusTrail(nid)), 2)
        self.assertEqual(await store.notificationsForBulk("acme", "b1"), [nid])
        self.assertEqual(await store.stats(), QueueStats(queued=1, deferred=0, in_flight=0))
        (delivery,) = await store.claimDue(10, 60)
        self.assertEqual(delivery.message, BODY)

    async def test_namesWithColons(self) -> None:
        """Account and bulk ids with colons in them never share an index key."""
        first = await self.enqueued(account="a:b", bulkId="c")
        second = await self.enqueued(account="a", bulkId="b:c")
        self.assertEqual(await self.store.notificationsForBulk("a:b", "c"), [first.notification_id])
        self.assertEqual(
            await self.store.notificationsForBulk("a", "b:c"), [second.notification_id]
        )

    async def test_layout(self) -> None:
        """The keys the module documentation promises, with the types it promises."""
        await self.store.addAccount("acme", "h")
        await self.store.addApiKey("acme", "k1", "a" * 64)
        await self.store.addSender(Sender("acme", "acme.example", "domain"))
        notification = await self.enqueued(bulkId="b1")
        nid = notification.notification_id
        await self.store.addEvents([StatusEvent(nid, ALICE, "CAAS_SENT", "Successful", T0)])
        expected = {
            "account:acme": "hash",
            "accounts": "set",
            f"apikey:{'a' * 64}": "hash",
            "apikey-id:k1": "string",
            "apikeys:acme": "zset",
            "apikey-sequence": "string",
            "senders:acme": "hash",
            f"notification:{nid}": "hash",
            f"body:{nid}": "string",
            f"events:{nid}": "list",
            "queue:queued": "zset",
            "accepted:acme": "zset",
            "received": "zset",
            "bulk:4:acme:b1": "zset",
            "instance": "string",
            f"instance-lease:{self.store.instanceId}": "string",
        }
        keys = await self.storedKeys()
        self.assertEqual(sorted(k.removeprefix(self.prefix) for k in keys), sorted(expected))
        for name, kind in expected.items():
            self.assertEqual(await self.redis("TYPE", self.prefix + name), kind, name)


class EnqueueTests(RedisStoreTestsBase):
    """One script per notification: all of it or none of it, on connections given back."""

    async def test_receivedEventsImplied(self) -> None:
        """Enqueue writes no event entries, however many recipients: the hash's recipients and
        received time imply the CAAS_RECEIVED events. Later events are entries, and the trail
        has both in time order."""
        recipients = tuple(Recipient(f"r{i}@example.com", "email") for i in range(50))
        many = await self.enqueued(recipients=(PHONE, *recipients))
        nid = many.notification_id
        self.assertEqual(await self.redis("EXISTS", f"{self.prefix}events:{nid}"), 0)
        trail = await self.store.statusTrail(nid)
        self.assertEqual([e.recipient for e in trail], list(many.recipients))
        self.assertEqual({(e.status_code, e.timestamp) for e in trail}, {("CAAS_RECEIVED", T0)})
        self.assertEqual(trail[0].status_text, STATUS_TEXTS["CAAS_RECEIVED"])

        early = StatusEvent(nid, PHONE, "CAAS_SENT", "Successful", T0 - timedelta(seconds=1))
        same = StatusEvent(nid, PHONE, "CAAS_SENT", "Successful", T0)
        await self.store.addEvents([same, early])
        self.assertEqual(await self.redis("LLEN", f"{self.prefix}events:{nid}"), 2)
        self.assertEqual(await self.store.statusTrail(nid), [early, *trail, same])

    async def test_notificationsFromBeforeImpliedEvents(self) -> None:
        """A notification enqueued by an older mailrelay (its CAAS_RECEIVED events are entries
        of events:<id>, its hash has no received_events field) reads as before: each event
        once."""
        old = await self.enqueued(recipients=(ALICE, PHONE))
        nid = old.notification_id
        await self.redis("HDEL", f"{self.prefix}notification:{nid}", "received_events")
        millis = int(T0.timestamp() * 1000)
        entries = [
            json.dumps([r.address, r.channel, "CAAS_RECEIVED", "Successful", millis])
            for r in (ALICE, PHONE)
        ]
        await self.redis("RPUSH", f"{self.prefix}events:{nid}", *entries)
        sent = StatusEvent(nid, PHONE, "CAAS_SENT", "Successful", T0 + timedelta(seconds=1))
        await self.store.addEvents([sent])
        self.assertEqual(
            [(e.recipient, e.status_code) for e in await self.store.statusTrail(nid)],
            [(ALICE, "CAAS_RECEIVED"), (PHONE, "CAAS_RECEIVED"), (PHONE, "CAAS_SENT")],
        )
        self.assertEqual(await self.store.getNotification(nid), old)

    async def test_refusedCommandLeavesNothing(self) -> None:
        """
        A user who may not write the bulk index: the server refuses the enqueue script before
        it runs (every key it writes is declared), so nothing is stored. The connection is
        usable afterwards.
        """
        user, password = f"mailrelay-test-{uuid.uuid4().hex}", uuid.uuid4().hex
        allowed = ["notification:*", "body:*", "events:*", "queue:*", "accepted:*", "received"]
        patterns = [f"~{self.prefix}{pattern}" for pattern in allowed]
        await self.redis("ACL", "SETUSER", user, "on", f">{password}", "+@all", *patterns)
        self.addCleanup(self.redis, "ACL", "DELUSER", user)
        url = f"redis://{user}:{password}@{HOST}:{PORT}/0"
        store = await self.openStore(url, instanceId=1, poolSize=1)
        self.store = store
        before = await self.storedKeys()

        with self.assertRaises(StoreError) as caught:
            await self.enqueued(bulkId="b1")
        self.assertIn("nothing stored", str(caught.exception))
        self.assertIn("NOPERM", str(caught.exception))
        self.assertEqual(await self.storedKeys(), before)
        self.assertEqual(await store.stats(), QueueStats(0, 0, 0))

        notification = await self.enqueued()  # the only connection is back in the pool
        self.assertEqual(await store.getNotification(notification.notification_id), notification)

    async def test_duplicatesGiveConnectionsBack(self) -> None:
        store = await self.openStore(poolSize=2)
        self.store = store
        notification = await self.enqueued()
        duplicates = [store.enqueue(notification, b"again") for _ in range(5)]
        for d in duplicates:
            with self.assertRaises(AlreadyExists):
                await d
        fresh = [self.notification() for _ in range(5)]
        await gatherResults([store.enqueue(n, BODY) for n in fresh])
        self.assertEqual((await store.stats()).queued, 6)
        self.assertEqual(len(await store.statusTrail(notification.notification_id)), 2)

    async def test_concurrentEnqueues(self) -> None:
        notifications = [self.notification(recipients=(ALICE, BOB)) for _ in range(50)]
        await gatherResults([self.store.enqueue(n, BODY) for n in notifications])
        self.assertEqual((await self.store.stats()).queued, 50)
        for n in notifications:
            self.assertEqual(await self.store.getNotification(n.notification_id), n)

    async def test_waitForReplicas(self) -> None:
        """
        ``?wait=1`` on a server without replicas: WAIT answers 0, so the enqueue fails (the
        client will retry) although the primary has the message.
        """
        store = await self.openStore(f"{URL}?wait=1&wait_timeout=20")
        self.store = store
        with self.assertRaises(StoreError) as caught:
            await self.enqueued()
        self.assertIn("0 of 1 replicas", str(caught.exception))
        self.assertEqual((await store.stats()).queued, 1)

    async def test_notAnId(self) -> None:
        notification = dataclasses.replace(self.notification(), notification_id="x1")
        with self.assertRaises(StoreError):
            await self.store.enqueue(notification, BODY)
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 0))


class DeliveryQueueTests(DeliveryQueueTestsMixin, RedisStoreTestsBase):
    async def test_relaysNeverClaimTheSameNotification(self) -> None:
        """Two relays on one server claim the same queue at once, in small batches, until
        it is empty: each notification is claimed exactly once."""
        other = await self.openStore()
        notifications = [self.notification(receivedAt=T0) for _ in range(200)]
        await gatherResults([self.store.enqueue(n, BODY) for n in notifications])
        claims: dict[str, list[str]] = {}

        async def drain(store: RedisStore, name: str) -> None:
            while True:
                claimed = await store.claimDue(3, leaseSeconds=60)
                if not claimed:
                    return
                for delivery in claimed:
                    claims.setdefault(delivery.notification.notification_id, []).append(name)

        await gatherResults(
            [
                Deferred.fromCoroutine(drain(store, f"{name}{i}"))
                for i in range(4)
                for name, store in (("first", self.store), ("second", other))
            ]
        )
        self.assertEqual(set(claims), {n.notification_id for n in notifications})
        self.assertEqual({nid: len(names) for nid, names in claims.items() if len(names) > 1}, {})
        self.assertTrue({names[0][:-1] for names in claims.values()} == {"first", "second"})
        self.assertEqual(await self.store.stats(), QueueStats(0, 0, 200))

    async def test_layoutOfTheDeliveryQueue(self) -> None:
        """A notification in flight has its lease in its hash, a retried one its pending
        recipients; held ones are in queue:held; DKIM keys in dkim:<domain>."""
        notification = await self.enqueued(recipients=(ALICE, PHONE))
        nid = notification.notification_id
        key = f"{self.prefix}notification:{nid}"
        (delivery,) = await self.store.claimDue(10, 60)
        self.assertEqual(await self.redis("HGET", key, "lease"), delivery.lease.encode())
        await self.store.recordOutcome(nid, delivery.lease, [], [ALICE], T0)
        self.assertEqual(await self.redis("HMGET", key, "pending", "lease"), [b"[1]", None])
        await self.store.hold(nid, None)
        self.assertEqual(
            await self.redis("ZSCORE", f"{self.prefix}queue:held", nid), b"1425826710252"
        )
        await self.store.putDkimKey(DkimKey("example.com", "s", "rsa", b"pem", T0))
        self.assertEqual(await self.redis("TYPE", f"{self.prefix}dkim:example.com"), "hash")
        self.assertEqual(
            await self.redis("SMEMBERS", f"{self.prefix}dkim-domains"), [b"example.com"]
        )

    async def test_accountWithoutBouncesField(self) -> None:
        """An account stored before the setting existed has bounces on."""
        await self.store.addAccount("acme", "h")
        await self.redis("HDEL", f"{self.prefix}account:acme", "bounces")
        store = await self.openStore()
        self.assertTrue((await store.getAccount("acme")).bounces)

    async def test_queuePages(self) -> None:
        """The operator's listing and changes by account page through long queues."""
        self.store.queuePage = 3
        mine = [await self.enqueued(receivedAt=T0 + timedelta(seconds=i)) for i in range(7)]
        theirs = [await self.enqueued(account="other", receivedAt=T0) for _ in range(4)]
        items = await self.store.queueItems(None, "acme", 5)
        self.assertEqual([i.notification_id for i in items], [n.notification_id for n in mine[:5]])
        self.assertEqual(len(await self.store.queueItems("queued", None, 100)), 11)
        self.assertEqual(await self.store.hold(None, "acme"), 7)
        self.assertEqual(await self.store.stats(), QueueStats(4, 0, 0, held=7))
        self.assertEqual(await self.store.release(None, "acme"), 7)
        self.assertEqual(await self.store.hold(None, "other"), 4)
        self.assertEqual(await self.store.release(None, None), 4)
        self.assertEqual(await self.store.retryNow(None), 11)
        self.assertEqual(len(theirs), 4)

    async def test_expireInBatches(self) -> None:
        """Expiry pages through ``received`` past the notifications it has to keep."""
        self.store.expireBatch = 3
        kept, gone = [], []
        for i in range(10):
            notification = await self.enqueued(receivedAt=T0 + timedelta(seconds=i))
            if i % 3:
                await self.finishDelivery(notification.notification_id)
                gone.append(notification)
            else:
                kept.append(notification)
        self.assertEqual(await self.store.expire(T0 + timedelta(days=1)), len(gone))
        for notification in gone:
            self.assertIsNone(await self.store.getNotification(notification.notification_id))
        for notification in kept:
            self.assertIsNotNone(await self.store.getNotification(notification.notification_id))
        self.assertEqual(await self.store.acceptedSince("acme", T0), len(kept))


class FailureTests(RedisStoreTestsBase):
    """Every failure is a StoreError, raised in time, and the store recovers."""

    async def assertStoreError(self, d: Deferred[Any]) -> StoreError:
        try:
            await d
        except StoreError as e:
            return e
        self.fail("no StoreError")

    async def test_unreachable(self) -> None:
        store = RedisStore(f"redis://{HOST}:{freePort()}/0", reactor, keyPrefix=self.prefix)
        started = time.monotonic()
        error = await self.assertStoreError(store.open())
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("refused", str(error))
        await self.assertStoreError(store.getAccount("acme"))
        await self.assertStoreError(store.enqueue(self.notification(), BODY))
        self.assertRaises(StoreError, store.nextNotificationId)
        await store.close()

    async def test_badDatabaseOrPassword(self) -> None:
        if not redisAnswers():
            raise SkipTest(f"no redis server on {HOST}:{PORT}")
        for url in (f"redis://{HOST}:{PORT}/4000", f"redis://:wrong@{HOST}:{PORT}/0"):
            await self.assertStoreError(RedisStore(url, reactor, keyPrefix=self.prefix).open())

    def test_badURL(self) -> None:
        for url in (
            "http://127.0.0.1/0",
            "redis://127.0.0.1/zero",
            "redis://127.0.0.1:99999/0",
            "redis://127.0.0.1/0?colour=blue",
            "redis://127.0.0.1/0?wait=many",
        ):
            self.assertRaises(ValueError, RedisStore, url, reactor)
        self.assertRaises(ValueError, RedisStore, URL, reactor, instanceId=1024)

    def test_parseURL(self) -> None:
        self.assertEqual(parseRedisURL("redis://"), RedisURL())
        parsed = parseRedisURL("redis://app:s%40cret@[::1]:6380/3?wait=2&wait_timeout=250")
        self.assertEqual(
            parsed, RedisURL("::1", 6380, 3, "app", "s@cret", wait=2, waitTimeoutMs=250)
        )
        self.assertEqual(parsed.address, "[::1]:6380/3")
        self.assertNotIn("s@cret", repr(parsed))

    def test_badURLErrorHidesThePassword(self) -> None:
        for url in ("//app:s3cret@host:6379/0", "rediss://app:s3cret@host/0"):
            with self.assertRaises(ValueError) as caught:
                parseRedisURL(url)
            self.assertIn("not a redis:// URL", str(caught.exception))
            self.assertNotIn("s3cret", str(caught.exception))

    async def test_serverGoesAwayAndComesBack(self) -> None:
        """
        A private server is killed: operations fail with StoreError within the timeout; once
        it runs again the pool reconnects by itself.
        """
        if shutil.which("redis-server") is None:
            raise SkipTest("redis-server is not installed")
        port = freePort()
        server = self.startServer(port)
        store = await self.openStore(f"redis://{HOST}:{port}/0", timeout=0.5, poolSize=2)
        await store.addAccount("acme", "h")
        server.kill()
        server.wait()

        started = time.monotonic()
        await self.assertStoreError(store.listAccounts())
        self.assertLess(time.monotonic() - started, 1.5)

        self.startServer(port)  # empty: it kept nothing
        answer = await self.eventually(store.listAccounts, deadline=10)
        self.assertEqual(answer, [])
        await store.addAccount("acme", "h")

    def startServer(self, port: int) -> subprocess.Popen[bytes]:
        command = ["redis-server", "--bind", HOST, "--port", str(port), "--save", ""]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        self.addCleanup(server.wait)
        self.addCleanup(server.kill)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                return server
            except OSError:
                time.sleep(0.02)
        self.fail("redis-server did not start")

    async def eventually(self, operation: Callable[[], Deferred[Any]], deadline: float) -> Any:
        """``operation()``'s result once it stops failing with StoreError."""
        end = time.monotonic() + deadline
        while True:
            try:
                return await operation()
            except StoreError:
                if time.monotonic() > end:
                    raise
            await deferLater(reactor, 0.1, lambda: None)


class MakeStoreTests(TestCase):
    """makeStore's redis branch."""

    def test_redis(self) -> None:
        config = parseConfig({"store": {"backend": "redis", "redis_url": "redis://db.internal/2"}})
        store = makeStore(config, reactor)
        assert isinstance(store, RedisStore)
        self.assertEqual((store.url.host, store.url.db), ("db.internal", 2))
        self.assertIsNone(store.instanceId)  # instance_id 0: allocated at open

    def test_explicitInstance(self) -> None:
        config = parseConfig({"store": {"backend": "redis", "instance_id": 5}})
        store = makeStore(config, reactor)
        assert isinstance(store, RedisStore)
        self.assertEqual(store.instanceId, 5)

    def test_badURL(self) -> None:
        config = parseConfig({"store": {"backend": "redis", "redis_url": "redis://h/x"}})
        with self.assertRaises(ConfigError) as caught:
            makeStore(config, reactor)
        self.assertIn("store.redis_url", str(caught.exception))


class AccountValuesTests(RedisStoreTestsBase):
    """Field values that a careless encoding would turn into something else."""

    async def test_numericLookingStrings(self) -> None:
        account = Account(name="007", password_hash="1e5", networks=())
        await self.store.addAccount(account.name, account.password_hash)
        self.assertEqual(await self.store.getAccount("007"), account)
        await self.store.addSender(Sender("007", "0123", "sms"))
        self.assertEqual(await self.store.listSenders("007"), [Sender("007", "0123", "sms")])


class ReportQueueTests(ReportQueueTestsMixin, RedisStoreTestsBase):
    pass


class GatewayIdsTests(GatewayIdsTestsMixin, RedisStoreTestsBase):
    pass
