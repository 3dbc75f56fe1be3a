"""
The Redis store: everything mailrelay keeps, in one Redis server shared by several relays.

Layout: see :mod:`mailrelay.store.redis.keys` (hashes for accounts, keys and notifications,
sorted sets for the queue and the indexes, a list of JSON per status trail).

Atomicity. :meth:`RedisStore.enqueue` writes everything about one notification -- its hash
(whose recipients and received time imply its ``CAAS_RECEIVED`` events), body, queue entry
and index entries -- with ONE Lua script
(``ENQUEUE``, one command and one round trip), which Redis runs without anything in between:
it checks that the notification key is absent (else AlreadyExists) and then writes. Every key
it writes is declared, so what the server refuses up front (no permission on a key, out of
memory, a read-only replica) refuses the whole script and nothing is half-stored. Every other
check-then-write (account exists, key not taken, entry still queued) is a Lua script of
:mod:`mailrelay.store.redis.scripts` too.

Durability (SPEC §6). The Deferred of :meth:`RedisStore.enqueue` fires only once the script
has answered: the server has the message. That it is also *on disk* is the server's
configuration: ``appendonly yes`` with ``appendfsync always`` (a warning is logged at open
when the append-only file is off). With replicas, ``redis_url = "redis://host/0?wait=1"``
adds ``WAIT 1 1000`` after each enqueue (on the same connection) and fails the enqueue with
StoreError unless that many replicas acknowledged within the time (``&wait_timeout=MS``,
default 1000). Such a
failure cannot take back what the primary already applied: the client retries (it got
``451``), and the first copy is delivered as well.

Relays sharing one Redis. Notification ids carry a 10-bit instance number
(:mod:`mailrelay.ids`). Without ``instanceId`` the store leases one at :meth:`RedisStore.open`:
it tries the numbers ``INCR <prefix>instance`` gives (modulo 1024) until ``SET NX`` takes
``<prefix>instance-lease:<n>``, renews the lease every ``LEASE_SECONDS / 3`` while open and
releases it at close. So no two open stores ever hold the same number, however many admin
commands come and go; a store that cannot renew in time (the lease expired, e.g. after a long
pause) logs it and takes a fresh number. At most 1024 stores can be open at once. Give either
every relay an explicit ``instanceId`` or none.

Delivery. Each claim, lease renewal, outcome and operator's change of a queue entry is one
Lua script, so a lease token is checked and the write made with nothing in between: two
relays that claim at once never both hold a lease on one notification, and a worker whose
lease was taken over writes nothing (LeaseLost). Operator's changes that concern a whole
account walk the queue a page (``QUEUE_PAGE`` entries) per script, so that none blocks the
server for long; each entry changes atomically, the set of them is not a snapshot.

Failures reach the caller as :class:`~mailrelay.interfaces.StoreError` (AlreadyExists /
NotFound where the interface says), never as a txredisapi exception; an operation that gets
no answer within ``timeout`` seconds (server down: the pool keeps reconnecting) fails so too.
Account, API key and sender lookups are remembered for ``ACCOUNT_CACHE_SECONDS``, as in the
SQLite store: this store's own writes clear them at once, other relays' are seen within that.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import txredisapi
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.ids import MAX_INSTANCE, NotificationIdGenerator
from mailrelay.interfaces import (
    AlreadyExists,
    InsufficientCredits,
    IStore,
    LeaseLost,
    NotFound,
    StoreError,
)
from mailrelay.model import (
    Account,
    ApiKey,
    ClaimedReport,
    Delivery,
    DkimKey,
    FirstAttempt,
    MessageText,
    Notification,
    PendingReport,
    QueueItem,
    QueueState,
    QueueStats,
    Recipient,
    ReportAttempt,
    Sender,
    StatusEvent,
    joinText,
)
from mailrelay.store.cache import AccountCache
from mailrelay.store.common import (
    fromMillis,
    idNumber,
    recipientsFromJSON,
    toMillis,
    trailWithReceived,
)
from mailrelay.store.redis import scripts
from mailrelay.store.redis.client import RedisClient, ResponseError
from mailrelay.store.redis.codec import (
    accountFields,
    accountFromFields,
    dkimKeyFields,
    dkimKeyFromFields,
    eventFromJSON,
    eventJSON,
    fieldsOf,
    flatten,
    notificationFields,
    notificationFromFields,
    pendingOf,
    queueItemFromFields,
    text,
)
from mailrelay.store.redis.keys import QUEUE_STATES, Keys
from mailrelay.store.redis.reports import (
    attemptFromJSON,
    attemptJSON,
    reportFromJSON,
    reportJSON,
)
from mailrelay.store.redis.url import parseRedisURL

T = TypeVar("T")

DEFAULT_PREFIX = "mailrelay:"
LEASE_SECONDS = 60
"""How long an instance-number lease lasts unless renewed (every third of it)."""
RECEIVED_EVENTS_IMPLIED = ("received_events", "implied")
"""The field and value in ``notification:<id>`` that say its CAAS_RECEIVED events are implied
by its ``recipients`` and ``received`` fields (every notification enqueued since they are);
without it, they are entries of ``events:<id>`` like every later event."""

DEFAULT_TIMEOUT = 10.0
"""Seconds an operation may take, connecting included, before it fails with StoreError."""
DEFAULT_POOL_SIZE = 10
FENCE_MARGIN = 2.0
FENCE_SLACK = 1.0
SETTLE_LIMIT = 300.0
"""Seconds an enqueue of unknown outcome keeps asking a silent server whether it was stored."""
"""Seconds past an enqueue's fence deadline (our clock) before asking whether it was stored:
the error of the measured clock offset."""
"""Seconds before the timeout at which an enqueue stops being written (at most half the
timeout): room for the answer to travel back and for the clock offset's error."""
EXPIRE_BATCH = 500
"""Notifications one expire script looks at: each script call blocks the server briefly."""
QUEUE_PAGE = 500
"""Queue entries one script of an operator's listing or change (by account, or all) looks at."""


@implementer(IStore)
class RedisStore:
    """
    The Redis backend of :class:`~mailrelay.interfaces.IStore`.

    ``url`` is ``redis://[[user]:password@]host[:port][/db][?wait=N&wait_timeout=MS]``, or
    ``redis-sentinel://`` with the sentinels' addresses and the service name (see
    :mod:`mailrelay.store.redis.url`; ValueError if it is neither); ``reactor`` tells the
    time; ``instanceId`` goes into notification ids (None: allocated at open); every key
    starts with ``keyPrefix``. Call :meth:`open` first and :meth:`close` last.
    """

    name = "redis"
    log = Logger()
    expireBatch = EXPIRE_BATCH
    queuePage = QUEUE_PAGE

    def __init__(
        self,
        url: str,
        reactor: Any,
        instanceId: int | None = None,
        keyPrefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        poolSize: int = DEFAULT_POOL_SIZE,
    ) -> None:
        self.url = parseRedisURL(url)
        if self.url.wait and self.url.waitTimeoutMs >= timeout * 1000:
            raise ValueError(f"wait_timeout must be shorter than the store's {timeout:g} s")
        if instanceId is not None and not 0 <= instanceId <= MAX_INSTANCE:
            raise ValueError(f"instance id must be 0..{MAX_INSTANCE}, not {instanceId}")
        self._reactor: IReactorTime = reactor
        self._keys = Keys(keyPrefix)
        self._timeout = timeout
        self._poolSize = poolSize
        # The server's clock minus ours (seconds), measured at open: enqueue deadlines are
        # given in the server's time, which the script checks with TIME.
        self._serverOffset = 0.0
        self._instanceId = instanceId
        self._leased = False
        self._leaseToken = secrets.token_hex(16)
        self._leaseRenewal: LoopingCall | None = None
        self._newId: NotificationIdGenerator | None = None
        if instanceId is not None:
            self._newId = NotificationIdGenerator(instanceId, reactor.seconds)
        self._client: RedisClient | None = None
        self._closing = False
        self._running: set[Deferred[Any]] = set()
        self._accountCache = AccountCache(reactor)

    def __repr__(self) -> str:
        return f"<RedisStore {self.url.address} prefix={self._keys.prefix!r}>"

    @property
    def instanceId(self) -> int | None:
        """The instance number in this store's notification ids (None until allocated)."""
        return self._instanceId

    # -- running operations --

    def _run(self, work: Callable[[RedisClient], Coroutine[Any, Any, T]]) -> Deferred[T]:
        """``work(client)`` with the time limit, its failures as StoreError."""
        if self._client is None or self._closing:
            return _failed(StoreError(f"redis store {self.url.address} is not open"))
        d = Deferred.fromCoroutine(work(self._client))
        d.addTimeout(self._timeout, self._reactor)
        d.addErrback(self._storeError)
        self._running.add(d)
        d.addBoth(self._finished, d)
        return d

    def _finished(self, result: Any, d: Deferred[Any]) -> Any:
        self._running.discard(d)
        return result

    def _storeError(self, failure: Failure) -> Failure:
        error = failure.value
        if self._client is not None and error is not None:
            self._client.noticeFailure(error.__cause__ or error)
        if isinstance(error, StoreError | CancelledError):
            return failure
        if isinstance(error, TimeoutError):
            reason = f"no answer within {self._timeout:g} s"
        else:
            reason = str(error) or type(error).__name__
        raise StoreError(f"redis store {self.url.address}: {reason}") from error

    # -- lifecycle --

    async def _open(self) -> None:
        client = RedisClient(self.url, self._timeout, self._poolSize)
        probe = await client.probe()
        try:
            await probe.execute_command("PING")
            self._serverOffset = await _clockOffset(probe)
            if self._leased or self._newId is None:
                await self._leaseInstance(probe)
            await self._checkPersistence(probe)
        finally:
            await probe.disconnect()
        client.start()
        try:
            await client.command("PING")
        except BaseException:
            await client.stop()
            raise
        self._client = client
        if self._leased:
            self._leaseRenewal = LoopingCall(lambda: Deferred.fromCoroutine(self._renewLease()))
            self._leaseRenewal.clock = self._reactor
            self._leaseRenewal.start(LEASE_SECONDS / 3, now=False)

    async def _leaseInstance(self, connection: Any) -> None:
        """Take an instance number no other open store holds (see the module docstring)."""
        for _ in range(MAX_INSTANCE + 1):
            counter = await connection.execute_command("INCR", self._keys.instance)
            number = (counter - 1) % (MAX_INSTANCE + 1)
            lease = self._keys.instanceLease(number)
            taken = await connection.execute_command(
                "SET", lease, self._leaseToken, "NX", "EX", LEASE_SECONDS
            )
            if taken is not None:
                self._leased = True
                self._instanceId = number
                self._newId = NotificationIdGenerator(number, self._reactor.seconds)
                return
        raise StoreError(f"redis store: all {MAX_INSTANCE + 1} instance numbers are leased")

    async def _renewLease(self) -> None:
        client, number = self._client, self._instanceId
        if client is None or number is None:
            return
        key = self._keys.instanceLease(number)
        try:
            ours = await client.eval(scripts.RENEW_LEASE, [key], [self._leaseToken, LEASE_SECONDS])
            if not ours:
                self.log.error(
                    "redis store lost its lease on instance number {instance}; taking another",
                    instance=number,
                )
                connection = await client.reserve()
                try:
                    await self._leaseInstance(connection)
                finally:
                    client.giveBack(connection, clean=True)
        except Exception as e:
            self.log.warn("redis store could not renew its instance lease: {error}", error=e)

    async def _releaseLease(self, client: RedisClient) -> None:
        if not self._leased or self._instanceId is None:
            return
        key = self._keys.instanceLease(self._instanceId)
        try:
            await client.eval(scripts.RELEASE_LEASE, [key], [self._leaseToken])
        except Exception as e:
            self.log.warn("redis store could not release its instance lease: {error}", error=e)

    async def _checkPersistence(self, probe: Any) -> None:
        try:
            info = text(await probe.execute_command("INFO", "persistence"))
        except ResponseError:
            return  # INFO not allowed: nothing to say
        if "aof_enabled:0" in info.split():
            self.log.warn(
                "redis at {address} has no append-only file (appendonly no): a message it "
                "acknowledged is lost if the server stops before its next snapshot",
                address=self.url.address,
            )

    def open(self) -> Deferred[None]:
        """Connect, check the server answers, take an instance number. Deferred[None]."""
        if self._client is not None:
            return succeed(None)
        self._closing = False
        d = Deferred.fromCoroutine(self._open())
        d.addTimeout(self._timeout, self._reactor)
        d.addCallback(self._opened)
        return d.addErrback(self._storeError)

    def _opened(self, _: None) -> None:
        self.log.info(
            "redis store open: {address}, key prefix {prefix!r}, instance {instance}",
            address=self.url.address,
            prefix=self._keys.prefix,
            instance=self._instanceId,
        )

    async def _close(self) -> None:
        self._closing = True
        # Let what was asked for finish (each within the timeout): its caller hears the outcome.
        await DeferredList(list(self._running), consumeErrors=True)
        if self._leaseRenewal is not None and self._leaseRenewal.running:
            self._leaseRenewal.stop()
        self._leaseRenewal = None
        client, self._client = self._client, None
        if client is not None:
            await self._releaseLease(client)
            await client.stop()

    def close(self) -> Deferred[None]:
        """Wait for operations under way, then disconnect. Returns Deferred[None]."""
        return Deferred.fromCoroutine(self._close())

    def ping(self) -> Deferred[float]:
        """One PING round trip. Returns Deferred[float] (seconds)."""

        async def ping(client: RedisClient) -> float:
            started = time.perf_counter()
            await client.command("PING")
            return time.perf_counter() - started

        return self._run(ping)

    # -- accounts, API keys, senders --

    def _remembered(
        self, key: tuple[str, str], work: Callable[[RedisClient], Coroutine[Any, Any, T]]
    ) -> Deferred[T]:
        """``work``'s result, or what it gave less than ACCOUNT_CACHE_SECONDS ago."""
        return self._accountCache.lookup(key, partial(self._run, work))

    def _changeAccountData(
        self, work: Callable[[RedisClient], Coroutine[Any, Any, T]]
    ) -> Deferred[T]:
        """Run a write that changes accounts, keys or senders; forget what was remembered."""
        return self._accountCache.change(partial(self._run, work))

    def addAccount(self, name: str, passwordHash: str) -> Deferred[Account]:
        account = Account(name=name, password_hash=passwordHash)

        async def add(client: RedisClient) -> Account:
            keys = self._keys
            done = await client.eval(
                scripts.ADD_ACCOUNT,
                [keys.account(name), keys.accounts],
                [name, *flatten(accountFields(account))],
            )
            if done == scripts.EXISTS:
                raise AlreadyExists(f"account exists already: {name}")
            return account

        return self._changeAccountData(add)

    def getAccount(self, name: str) -> Deferred[Account | None]:
        async def get(client: RedisClient) -> Account | None:
            fields = fieldsOf(await client.command("HGETALL", self._keys.account(name)))
            return accountFromFields(name, fields) if fields else None

        return self._remembered(("account", name), get)

    def listAccounts(self) -> Deferred[list[Account]]:
        async def listAll(client: RedisClient) -> list[Account]:
            keys = self._keys
            reply = await client.eval(scripts.LIST_ACCOUNTS, [keys.accounts], [keys.account("")])
            accounts = [
                accountFromFields(text(reply[i]), fieldsOf(reply[i + 1]))
                for i in range(0, len(reply), 2)
                if reply[i + 1]
            ]
            return sorted(accounts, key=lambda account: account.name)

        return self._run(listAll)

    def updateAccount(self, account: Account) -> Deferred[None]:
        async def update(client: RedisClient) -> None:
            done = await client.eval(
                scripts.UPDATE_ACCOUNT,
                [self._keys.account(account.name)],
                flatten(accountFields(account)),
            )
            if done == scripts.MISSING:
                raise NotFound(f"no such account: {account.name}")

        return self._changeAccountData(update)

    def addApiKey(self, account: str, keyId: str, keyHash: str) -> Deferred[ApiKey]:
        createdAt = int(self._reactor.seconds() * 1000)

        async def add(client: RedisClient) -> ApiKey:
            keys = self._keys
            done = await client.eval(
                scripts.ADD_API_KEY,
                [
                    keys.account(account),
                    keys.apiKey(keyHash),
                    keys.apiKeyId(keyId),
                    keys.apiKeys(account),
                    keys.apiKeySequence,
                ],
                [keyId, account, str(createdAt), keyHash],
            )
            if done == scripts.MISSING:
                raise NotFound(f"no such account: {account}")
            if done == scripts.EXISTS:
                raise AlreadyExists(f"API key exists already: {keyId}")
            return ApiKey(key_id=keyId, account=account, created_at=fromMillis(createdAt))

        return self._changeAccountData(add)

    def findApiKey(self, keyHash: str) -> Deferred[ApiKey | None]:
        async def find(client: RedisClient) -> ApiKey | None:
            fields = fieldsOf(await client.command("HGETALL", self._keys.apiKey(keyHash)))
            if not fields or fields["revoked"] != "0":
                return None
            return ApiKey(
                key_id=fields["key_id"],
                account=fields["account"],
                created_at=fromMillis(int(fields["created"])),
            )

        return self._remembered(("apikey", keyHash), find)

    def listApiKeys(self, account: str) -> Deferred[list[ApiKey]]:
        async def listAll(client: RedisClient) -> list[ApiKey]:
            keys = self._keys
            reply = await client.eval(
                scripts.LIST_API_KEYS, [keys.apiKeys(account)], [keys.apiKey("")]
            )
            apiKeys = [
                ApiKey(
                    key_id=text(reply[i]),
                    account=text(reply[i + 1]),
                    created_at=fromMillis(int(reply[i + 2])),
                )
                for i in range(0, len(reply), 3)
            ]
            # Insertion order, then by creation time: two relays' clocks may disagree a little.
            return sorted(apiKeys, key=lambda key: key.created_at)

        return self._run(listAll)

    def revokeApiKey(self, account: str, keyId: str) -> Deferred[bool]:
        async def revoke(client: RedisClient) -> bool:
            keys = self._keys
            done = await client.eval(
                scripts.REVOKE_API_KEY,
                [keys.apiKeyId(keyId), keys.apiKeys(account)],
                [account, keys.apiKey("")],
            )
            return bool(done == scripts.DONE)

        return self._changeAccountData(revoke)

    def addSender(self, sender: Sender) -> Deferred[None]:
        async def add(client: RedisClient) -> None:
            keys = self._keys
            done = await client.eval(
                scripts.ADD_SENDER,
                [keys.account(sender.account), keys.senders(sender.account)],
                [sender.value, sender.kind],
            )
            if done == scripts.MISSING:
                raise NotFound(f"no such account: {sender.account}")
            if done == scripts.EXISTS:
                raise AlreadyExists(f"sender exists already: {sender.value}")

        return self._changeAccountData(add)

    def listSenders(self, account: str) -> Deferred[list[Sender]]:
        async def listAll(client: RedisClient) -> list[Sender]:
            fields = fieldsOf(await client.command("HGETALL", self._keys.senders(account)))
            return [
                Sender(account=account, value=value, kind=kind)  # type: ignore[arg-type]
                for value, kind in sorted(fields.items())
            ]

        return self._remembered(("senders", account), listAll).addCallback(list)

    def removeSender(self, account: str, value: str) -> Deferred[bool]:
        async def remove(client: RedisClient) -> bool:
            return bool(await client.command("HDEL", self._keys.senders(account), value))

        return self._changeAccountData(remove)

    # -- the queue --

    def nextNotificationId(self) -> str:
        if self._newId is None:
            raise StoreError("redis store: no instance number before open()")
        return self._newId()

    def enqueue(
        self, notification: Notification, message: MessageText, smsCredits: int = 0
    ) -> Deferred[None]:
        nid = notification.notification_id
        if idNumber(nid) is None:
            return _failed(StoreError(f"not a notification id: {nid!r}"))
        keys, args = self._enqueueScript(notification, joinText(message))
        script = scripts.ENQUEUE
        # The fence (see scripts.ENQUEUE): the script must run before the caller's timeout
        # fires, with room left for the answer to come back, or not at all -- so a StoreError
        # for "no answer in time" means "not stored", and the client's retry is no duplicate.
        margin = min(FENCE_MARGIN, self._timeout / 2)
        fenceWindow = self._timeout - margin
        deadline = time.time() + self._serverOffset + fenceWindow
        args.insert(3, int(deadline * 1000))
        answered = False  # the script answered: its outcome is known either way
        sent = False  # the script may have reached the server
        if smsCredits > 0:
            script = scripts.ENQUEUE_CHARGED
            keys = [self._keys.account(notification.account), *keys]
            args = [smsCredits, *args]

        async def enqueue(client: RedisClient) -> None:
            nonlocal answered, sent
            sent = True
            if not self.url.wait:
                done = await _enqueued(client.eval(script, keys, args))
                answered = True
                _checkEnqueued(done, keys[0])
                return
            # WAIT counts the replicas that have this connection's writes: the same one.
            connection = await client.reserve()
            clean = False
            try:
                done = await _enqueued(connection.eval(script, keys, args))
                answered = True
                _checkEnqueued(done, keys[0])
                acknowledged = await connection.execute_command(
                    "WAIT", self.url.wait, self.url.waitTimeoutMs
                )
                clean = True
            finally:
                client.giveBack(connection, clean)
            if acknowledged < self.url.wait:
                raise StoreError(
                    f"{acknowledged} of {self.url.wait} replicas acknowledged the message"
                )

        started = self._reactor.seconds()

        def unknownOutcome(failure: Failure) -> Any:
            if (
                answered
                or not sent
                or _neverSent(failure.value)
                or (failure.check(StoreError) and "nothing stored" in str(failure.value))
            ):
                return failure
            return Deferred.fromCoroutine(
                self._settleEnqueue(keys[0], started + fenceWindow + FENCE_SLACK, failure)
            )

        return self._run(enqueue).addErrback(unknownOutcome)

    async def _settleEnqueue(self, notificationKey: str, after: float, failure: Failure) -> None:
        """
        An enqueue failed without the script's answer (a timeout, a connection lost after the
        script was sent, a server stopped between running the script and sending its answer):
        it may have run, or may yet run. Once its fence deadline is past it can no longer run;
        then the notification's key says whether it did. Stored: success, the client gets its
        250. Not stored: the failure, a 451 that means "not stored". While the server does
        not answer, it is asked again every second, for up to ``SETTLE_LIMIT`` seconds (the
        client waits for a reply to its final dot for 10 minutes, RFC 5321 4.5.3.2.6); past
        that the 451 is sent without knowing -- the one case left ambiguous.
        """
        giveUpAt = self._reactor.seconds() + SETTLE_LIMIT
        while True:
            wait = after - self._reactor.seconds()
            if wait > 0:
                await deferLater(self._reactor, wait, lambda: None)
            try:
                exists = await self._run(partial(_exists, key=notificationKey))
            except StoreError:
                if self._reactor.seconds() >= giveUpAt or self._closing:
                    failure.raiseException()
                after = self._reactor.seconds() + 1.0
                continue
            if not exists:
                failure.raiseException()
            self.log.info("enqueue of {key} was stored after all", key=notificationKey)
            return

    def _enqueueScript(
        self, notification: Notification, message: bytes
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of :data:`scripts.ENQUEUE` for one notification."""
        keys = self._keys
        nid = notification.notification_id
        received = str(toMillis(notification.received_at))
        scriptKeys = [
            keys.notification(nid),
            keys.body(nid),
            keys.queues[0],
            keys.accepted(notification.account),
            keys.received,
        ]
        bulkId = notification.options.bulk_id
        if bulkId is not None:
            scriptKeys.append(keys.bulk(notification.account, bulkId))
        fields = flatten(notificationFields(notification))
        return scriptKeys, [nid, received, message, *fields, *RECEIVED_EVENTS_IMPLIED]

    def acceptedSince(self, account: str, since: datetime) -> Deferred[int]:
        async def count(client: RedisClient) -> int:
            return int(
                await client.command(
                    "ZCOUNT", self._keys.accepted(account), toMillis(since), "+inf"
                )
            )

        return self._run(count)

    def stats(self) -> Deferred[QueueStats]:
        async def stats(client: RedisClient) -> QueueStats:
            queued, deferred, inFlight, held = await client.eval(
                scripts.STATS, list(self._keys.queues), []
            )
            return QueueStats(queued=queued, deferred=deferred, in_flight=inFlight, held=held)

        return self._run(stats)

    # -- the delivery queue --

    def _now(self) -> int:
        return int(self._reactor.seconds() * 1000)

    def claimDue(
        self, limit: int, leaseSeconds: float, firstAttempt: FirstAttempt | None = None
    ) -> Deferred[list[Delivery]]:
        if limit <= 0:
            return succeed([])
        now = self._now()
        leaseUntil = now + int(leaseSeconds * 1000)
        tokens = [secrets.token_hex(8) for _ in range(limit)]

        async def claim(client: RedisClient) -> list[Delivery]:
            keys = self._keys
            claimed, unreadable = await client.eval(
                scripts.CLAIM_DUE,
                list(keys.queues),
                [now, limit, leaseUntil, keys.notification(""), keys.body(""), *tokens],
            )
            for rawId in unreadable:
                self.log.error(
                    "claim: notification {id} left queued: its message is missing",
                    id=text(rawId),
                )
            deliveries = []
            for rawId, attempts, rawFields, body, token in claimed:
                nid = text(rawId)
                fields = fieldsOf(rawFields)
                notification = notificationFromFields(nid, fields)
                deliveries.append(
                    Delivery(
                        notification=notification,
                        message=bytes(body),
                        pending=pendingOf(notification, fields),
                        attempts=int(attempts),
                        lease=text(token),
                    )
                )
            return deliveries

        d = self._run(claim)
        if firstAttempt is not None:
            d.addCallback(
                lambda deliveries: Deferred.fromCoroutine(
                    self._recordFirstAttempts(deliveries, firstAttempt)
                )
            )
        return d

    async def _recordFirstAttempts(
        self, deliveries: list[Delivery], firstAttempt: FirstAttempt
    ) -> list[Delivery]:
        """What ``firstAttempt`` gives for each delivery of attempt 1, written under its new
        lease (a script of its own here: the claim's script knows nothing of events). One
        whose write fails is not handed out: its lease runs out and it is due again."""
        writes = []
        for delivery in deliveries:
            if delivery.attempts == 1:
                events, reports = firstAttempt(delivery)
                nid = delivery.notification.notification_id
                writes.append(
                    (delivery, self.recordOutcome(nid, delivery.lease, events, (), None, reports))
                )
        failed = set()
        for delivery, write in writes:
            try:
                await write
            except StoreError as e:
                failed.add(id(delivery))
                self.log.warn(
                    "claim: notification {id} not handed out: {error}",
                    id=delivery.notification.notification_id,
                    error=str(e),
                )
        return [d for d in deliveries if id(d) not in failed]

    def _leaseScript(self, source: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        """Run a script that checks a lease; LeaseLost if it answers that it is not current."""

        async def run(client: RedisClient) -> Any:
            answer = await client.eval(source, keys, args)
            if answer == scripts.LEASE_LOST:
                raise LeaseLost(f"the lease on {args[0]} is not current")
            return answer

        return self._run(run)

    def renewLease(self, notificationId: str, lease: str, leaseSeconds: float) -> Deferred[None]:
        keys = self._keys
        until = self._now() + int(leaseSeconds * 1000)
        return self._leaseScript(
            scripts.RENEW_CLAIM,
            [keys.notification(notificationId), keys.queues[2]],
            [notificationId, lease, until],
        ).addCallback(lambda _: None)

    def recordOutcome(
        self,
        notificationId: str,
        lease: str,
        events: Iterable[StatusEvent],
        finished: Iterable[Recipient],
        nextAttempt: datetime | None,
        reports: Iterable[PendingReport] = (),
    ) -> Deferred[None]:
        reports = tuple(reports)
        if any(report.notification_id != notificationId for report in reports):
            return _failed(
                StoreError(f"recordOutcome: reports of another notification than {notificationId}")
            )
        encoded = []
        for event in events:
            if event.notification_id != notificationId:
                return _failed(
                    StoreError(
                        f"recordOutcome: events of another notification than {notificationId}"
                    )
                )
            encoded.append(eventJSON(event))
        keys = self._keys
        _, deferred, inFlight, held = keys.queues
        done = [value for r in finished for value in (r.channel, r.address)]
        when = "" if nextAttempt is None else toMillis(nextAttempt)
        return self._leaseScript(
            scripts.RECORD_OUTCOME,
            [
                keys.notification(notificationId),
                keys.events(notificationId),
                deferred,
                inFlight,
                held,
                keys.body(notificationId),
                keys.reportsDue,
                keys.reportsOf(notificationId),
                *(keys.report(r.report_id) for r in reports),
            ],
            [
                notificationId,
                lease,
                when,
                len(encoded),
                *encoded,
                len(reports),
                self._now(),
                *(value for r in reports for value in (r.report_id, reportJSON(r))),
                *done,
            ],
        ).addCallback(lambda _: None)

    def releaseLease(self, notificationId: str, lease: str) -> Deferred[None]:
        keys = self._keys
        return self._leaseScript(
            scripts.RELEASE_CLAIM,
            [keys.notification(notificationId), *keys.queues],
            [notificationId, lease, self._now()],
        ).addCallback(lambda _: None)

    def queueItems(
        self, state: QueueState | None, account: str | None, limit: int
    ) -> Deferred[list[QueueItem]]:
        states = [state] if state is not None else list(QUEUE_STATES)

        async def items(client: RedisClient) -> list[QueueItem]:
            found: list[QueueItem] = []
            for each in states:
                found += await self._queuePage(client, each, account, limit)
            found.sort(key=lambda item: (item.next_attempt, int(item.notification_id)))
            return found[:limit]

        return self._run(items)

    async def _queuePage(
        self, client: RedisClient, state: QueueState, account: str | None, limit: int
    ) -> list[QueueItem]:
        """The first ``limit`` entries of queue ``state`` (of ``account``: None for all),
        looked for a page at a time so that no script walks a long queue at once."""
        key = self._keys.queues[QUEUE_STATES.index(state)]
        found: list[QueueItem] = []
        offset = 0
        while len(found) < limit:
            looked, *entries = await client.eval(
                scripts.QUEUE_PAGE,
                [key],
                [offset, self.queuePage, account or "", self._keys.notification("")],
            )
            for rawId, score, fields in entries:
                nid = text(rawId)
                found.append(queueItemFromFields(nid, state, score, fieldsOf(fields)))
            if looked < self.queuePage:
                break
            offset += looked
        return found[:limit]

    def queueItem(self, notificationId: str) -> Deferred[QueueItem | None]:
        if idNumber(notificationId) is None:
            return succeed(None)
        keys = self._keys

        async def item(client: RedisClient) -> QueueItem | None:
            answer = await client.eval(
                scripts.QUEUE_ITEM,
                [keys.notification(notificationId), *keys.queues],
                [notificationId],
            )
            if not answer:
                return None
            state, score, fields = answer
            return queueItemFromFields(
                notificationId, QUEUE_STATES[state - 1], score, fieldsOf(fields)
            )

        return self._run(item)

    def retryNow(self, notificationId: str | None) -> Deferred[int]:
        now = self._now()
        keys = self._keys
        dueKinds = list(keys.queues[:2])

        async def retry(client: RedisClient) -> int:
            if notificationId is not None:
                return int(await client.eval(scripts.RETRY_ONE, dueKinds, [notificationId, now]))
            for key in dueKinds:
                while (
                    await client.eval(scripts.RETRY_PAGE, [key], [now, self.queuePage])
                    >= self.queuePage
                ):
                    pass
            return sum([int(await client.command("ZCARD", key)) for key in dueKinds])

        return self._run(retry)

    def hold(self, notificationId: str | None, account: str | None) -> Deferred[int]:
        keys = self._keys
        queued, deferred, inFlight, held = keys.queues
        if notificationId is not None:
            return self._count(
                scripts.HOLD_ONE,
                [keys.notification(notificationId), *keys.queues],
                [notificationId],
            )
        if account is None:
            return _failed(StoreError("hold: name a notification or an account"))

        async def holdAll(client: RedisClient) -> int:
            await self._eachOfAccount(client, queued, account, "hold")
            await self._eachOfAccount(client, deferred, account, "hold")
            await self._eachOfAccount(client, inFlight, account, "mark")
            return await self._eachOfAccount(client, held, account, "count")

        return self._run(holdAll)

    def release(self, notificationId: str | None, account: str | None) -> Deferred[int]:
        keys = self._keys
        now = self._now()
        if notificationId is not None:
            return self._count(
                scripts.RELEASE_ONE,
                [keys.notification(notificationId), *keys.queues],
                [notificationId, now],
            )

        async def releaseAll(client: RedisClient) -> int:
            await self._eachOfAccount(client, keys.queues[2], account, "unmark")
            return await self._eachOfAccount(client, keys.queues[3], account, "release", now)

        return self._run(releaseAll)

    def _count(self, source: str, keys: list[str], args: list[Any]) -> Deferred[int]:
        """Run a script that answers with a count."""

        async def run(client: RedisClient) -> int:
            return int(await client.eval(source, keys, args))

        return self._run(run)

    async def _eachOfAccount(
        self, client: RedisClient, queue: str, account: str | None, what: str, now: int = 0
    ) -> int:
        """Do ``what`` (see :data:`scripts.ACCOUNT_PAGE`) to each entry of ``queue`` that is
        ``account``'s (None: everyone's), a page at a time. Returns how many there were."""
        keys = self._keys
        matched = offset = 0
        while True:
            looked, moved, found = await client.eval(
                scripts.ACCOUNT_PAGE,
                [queue, keys.queues[0], keys.queues[1], keys.queues[3]],
                [offset, self.queuePage, account or "", keys.notification(""), what, now],
            )
            matched += found
            offset += looked - moved
            if looked < self.queuePage:
                return matched

    def deleteQueued(
        self, notificationId: str, statusText: str, at: datetime
    ) -> Deferred[list[Recipient]]:
        keys = self._keys

        async def delete(client: RedisClient) -> list[Recipient]:
            answer = await client.eval(
                scripts.DELETE_QUEUED,
                [
                    keys.notification(notificationId),
                    keys.events(notificationId),
                    *keys.queues,
                    keys.body(notificationId),
                ],
                [notificationId, statusText, toMillis(at)],
            )
            if answer == scripts.MISSING:
                raise NotFound(f"not in the queue: {notificationId}")
            return [
                Recipient(address=text(answer[i]), channel=text(answer[i + 1]))  # type: ignore[arg-type]
                for i in range(0, len(answer), 2)
            ]

        return self._run(delete)

    # -- DKIM keys --

    def putDkimKey(self, key: DkimKey) -> Deferred[None]:
        async def put(client: RedisClient) -> None:
            await client.eval(
                scripts.PUT_DKIM_KEY,
                [self._keys.dkim(key.domain), self._keys.dkimDomains],
                [key.domain, *dkimKeyFields(key)],
            )

        return self._changeAccountData(put)

    def getDkimKey(self, domain: str) -> Deferred[DkimKey | None]:
        async def get(client: RedisClient) -> DkimKey | None:
            flat = await client.command("HGETALL", self._keys.dkim(domain))
            return dkimKeyFromFields(domain, flat) if flat else None

        return self._remembered(("dkim", domain), get)

    def listDkimKeys(self) -> Deferred[list[DkimKey]]:
        async def listAll(client: RedisClient) -> list[DkimKey]:
            reply = await client.eval(
                scripts.LIST_DKIM_KEYS, [self._keys.dkimDomains], [self._keys.dkim("")]
            )
            found = [
                dkimKeyFromFields(text(reply[i]), reply[i + 1]) for i in range(0, len(reply), 2)
            ]
            return sorted(found, key=lambda key: key.domain)

        return self._run(listAll)

    def removeDkimKey(self, domain: str) -> Deferred[bool]:
        async def remove(client: RedisClient) -> bool:
            removed = await client.eval(
                scripts.REMOVE_DKIM_KEY,
                [self._keys.dkim(domain), self._keys.dkimDomains],
                [domain],
            )
            return bool(removed)

        return self._changeAccountData(remove)

    # -- status trails --

    def getNotification(self, notificationId: str) -> Deferred[Notification | None]:
        if idNumber(notificationId) is None:
            return succeed(None)

        async def get(client: RedisClient) -> Notification | None:
            key = self._keys.notification(notificationId)
            fields = fieldsOf(await client.command("HGETALL", key))
            return notificationFromFields(notificationId, fields) if fields else None

        return self._run(get)

    def addEvents(self, events: Iterable[StatusEvent]) -> Deferred[None]:
        byNotification: dict[str, list[str]] = {}
        for event in events:
            byNotification.setdefault(event.notification_id, []).append(eventJSON(event))
        if not byNotification:
            return succeed(None)
        keys: list[str] = []
        args: list[Any] = []
        for nid, encoded in byNotification.items():
            keys += (self._keys.notification(nid), self._keys.events(nid))
            args += (len(encoded), *encoded)

        async def add(client: RedisClient) -> None:
            if await client.eval(scripts.ADD_EVENTS, keys, args) == scripts.MISSING:
                raise NotFound("status events for an unknown notification")

        return self._run(add)

    def notificationWithTrail(
        self, notificationId: str
    ) -> Deferred[tuple[Notification | None, list[StatusEvent]]]:
        return Deferred.fromCoroutine(self._notificationWithTrail(notificationId))

    async def _notificationWithTrail(
        self, notificationId: str
    ) -> tuple[Notification | None, list[StatusEvent]]:
        # Both asked at once: the two round trips to Redis overlap.
        notificationAsked = self.getNotification(notificationId)
        trailAsked = self.statusTrail(notificationId)
        try:
            notification = await notificationAsked
        except BaseException:
            trailAsked.addErrback(lambda _: None)  # the first failure is the one reported
            raise
        return notification, await trailAsked

    def statusTrail(self, notificationId: str) -> Deferred[list[StatusEvent]]:
        if idNumber(notificationId) is None:
            return succeed([])

        keys = [self._keys.notification(notificationId), self._keys.events(notificationId)]
        marker, implied = RECEIVED_EVENTS_IMPLIED

        async def trail(client: RedisClient) -> list[StatusEvent]:
            (recipients, received, how), entries = await client.eval(
                scripts.STATUS_TRAIL, keys, ["recipients", "received", marker]
            )
            events = [eventFromJSON(notificationId, entry) for entry in entries]
            if recipients is None or text(how or b"") != implied:
                # Enqueued before the events were implied: they are all in the list. Oldest
                # first; sorted() is stable, so equal times keep the order they were added.
                return sorted(events, key=lambda event: event.timestamp)
            return trailWithReceived(
                notificationId,
                recipientsFromJSON(text(recipients)),
                fromMillis(int(received)),
                events,
            )

        return self._run(trail)

    def notificationsForBulk(self, account: str, bulkId: str) -> Deferred[list[str]]:
        async def bulk(client: RedisClient) -> list[str]:
            key = self._keys.bulk(account, bulkId)
            reply = await client.command("ZRANGE", key, 0, -1, "WITHSCORES")
            scored = [(float(reply[i + 1]), int(reply[i])) for i in range(0, len(reply), 2)]
            return [str(number) for _, number in sorted(scored)]

        return self._run(bulk)

    def expire(self, before: datetime) -> Deferred[int]:
        async def expire(client: RedisClient) -> int:
            keys = self._keys
            prefixes = [
                keys.notification(""),
                keys.body(""),
                keys.events(""),
                keys.accepted(""),
                keys.bulkPrefix,
                keys.reportsOf(""),
                keys.report(""),
                keys.reportAttempts(""),
                keys.gatewayTexts(""),
                keys.gatewayText(""),
                keys.gatewayId(""),
            ]
            deleted = offset = 0
            while True:
                gone, looked = await client.eval(
                    scripts.EXPIRE,
                    [keys.received, *keys.queues, keys.reportsDue],
                    [toMillis(before), offset, self.expireBatch, *prefixes],
                )
                deleted += gone
                offset += looked - gone
                if looked < self.expireBatch:
                    return deleted

        return self._run(expire)

    # -- the report outbox --

    def addEventsWithReports(
        self, events: Iterable[StatusEvent], reports: Iterable[PendingReport]
    ) -> Deferred[None]:
        events, reports = tuple(events), tuple(reports)
        ids = {e.notification_id for e in events} | {r.notification_id for r in reports}
        if len(ids) > 1:
            return _failed(StoreError("addEventsWithReports: more than one notification"))
        if not ids:
            return succeed(None)
        (nid,) = ids
        keys = self._keys
        encoded = [eventJSON(e) for e in events]

        async def add(client: RedisClient) -> None:
            answer = await client.eval(
                scripts.ADD_EVENTS_WITH_REPORTS,
                [
                    keys.notification(nid),
                    keys.events(nid),
                    keys.reportsDue,
                    keys.reportsOf(nid),
                    *(keys.report(r.report_id) for r in reports),
                ],
                [
                    len(encoded),
                    *encoded,
                    len(reports),
                    self._now(),
                    *(value for r in reports for value in (r.report_id, reportJSON(r))),
                ],
            )
            if answer == scripts.MISSING:
                raise NotFound("status events for an unknown notification")

        return self._run(add)

    def claimReports(self, limit: int, leaseSeconds: float) -> Deferred[list[ClaimedReport]]:
        if limit <= 0:
            return succeed([])
        now = self._now()
        lease = secrets.token_hex(8)

        async def claim(client: RedisClient) -> list[ClaimedReport]:
            found = await client.eval(
                scripts.CLAIM_REPORTS,
                [self._keys.reportsDue],
                [now, limit, now + int(leaseSeconds * 1000), lease, self._keys.report("")],
            )
            return [
                ClaimedReport(reportFromJSON(text(data)), int(attempts), lease)
                for _, data, attempts in found
            ]

        return self._run(claim)

    def recordReportAttempt(
        self,
        claims: Iterable[tuple[str, str]],
        attempt: ReportAttempt | None,
        nextAttempt: datetime | None,
    ) -> Deferred[int]:
        claims = tuple(claims)
        keys = self._keys
        when = "" if nextAttempt is None else toMillis(nextAttempt)

        async def record(client: RedisClient) -> int:
            written = 0
            for reportId, lease in claims:
                data = await client.command("HGET", keys.report(reportId), "data")
                if data is None:
                    continue
                nid = reportFromJSON(text(data)).notification_id
                one = attempt
                if one is not None:
                    one = ReportAttempt(nid, reportId, one.host, one.code, one.outcome, one.at)
                written += await client.eval(
                    scripts.RECORD_REPORT_ATTEMPT,
                    [
                        keys.report(reportId),
                        keys.reportsDue,
                        keys.reportAttempts(nid),
                        keys.reportsOf(nid),
                    ],
                    [reportId, lease, "" if one is None else attemptJSON(one), when, self._now()],
                )
            return written

        return self._run(record)

    def reportAttempts(self, notificationId: str) -> Deferred[list[ReportAttempt]]:
        async def read(client: RedisClient) -> list[ReportAttempt]:
            entries = await client.command(
                "LRANGE", self._keys.reportAttempts(notificationId), 0, -1
            )
            return [attemptFromJSON(notificationId, text(entry)) for entry in entries]

        return self._run(read)

    def pendingReports(self) -> Deferred[int]:
        async def count(client: RedisClient) -> int:
            return int(await client.command("ZCARD", self._keys.reportsDue))

        return self._run(count)

    def markGone(self, url: str) -> Deferred[None]:
        async def mark(client: RedisClient) -> None:
            await client.command("SADD", self._keys.goneUrls, url)

        return self._run(mark)

    def isGone(self, url: str) -> Deferred[bool]:
        async def gone(client: RedisClient) -> bool:
            return bool(await client.command("SISMEMBER", self._keys.goneUrls, url))

        return self._run(gone)

    def webhookSecrets(self, account: str) -> Deferred[tuple[str, ...]]:
        async def read(client: RedisClient) -> tuple[str, ...]:
            stored = await client.command("GET", self._keys.webhookSecrets(account))
            return () if stored is None else tuple(json.loads(text(stored)))

        return self._remembered(("webhook", account), read)

    def setWebhookSecrets(self, account: str, secrets: Iterable[str]) -> Deferred[None]:
        value = json.dumps(list(secrets))

        async def write(client: RedisClient) -> None:
            if not await client.command("EXISTS", self._keys.account(account)):
                raise NotFound(f"no such account: {account}")
            await client.command("SET", self._keys.webhookSecrets(account), value)

        return self._changeAccountData(write)

    def sharedKey(self, name: str, candidate: bytes) -> Deferred[bytes]:
        async def keep(client: RedisClient) -> bytes:
            # Hex: the client's replies are text.
            value = await client.eval(
                scripts.SHARED_KEY, [self._keys.sharedKey(name)], [candidate.hex()]
            )
            return bytes.fromhex(text(value))

        return self._run(keep)

    # -- SMS gateway ids (IGatewayIds): keys that expire at their time --

    def rememberGatewayIds(
        self, notificationId: str, recipient: Recipient, ids: Iterable[str], until: datetime
    ) -> Deferred[None]:
        ids = tuple(ids)
        if not ids:
            return succeed(None)
        keys = self._keys

        async def remember(client: RedisClient) -> None:
            answer = await client.eval(
                scripts.REMEMBER_GATEWAY_IDS,
                [
                    keys.notification(notificationId),
                    keys.gatewayText(ids[0]),
                    keys.gatewayTexts(notificationId),
                    *(keys.gatewayId(ident) for ident in ids),
                ],
                [
                    notificationId,
                    ids[0],
                    recipient.address,
                    recipient.channel,
                    toMillis(until),
                    keys.gatewayText(""),
                    *ids,
                ],
            )
            if answer == scripts.MISSING:
                raise NotFound(f"gateway ids of an unknown notification {notificationId}")

        return self._run(remember)

    def lookupGatewayId(
        self, gatewayId: str
    ) -> Deferred[tuple[str, Recipient, tuple[str, ...]] | None]:
        async def lookup(client: RedisClient) -> tuple[str, Recipient, tuple[str, ...]] | None:
            found = await client.eval(
                scripts.LOOKUP_GATEWAY_ID,
                [self._keys.gatewayId(gatewayId)],
                [self._keys.gatewayText("")],
            )
            if not found:
                return None
            nid, address, channel, parts = found
            recipient = Recipient(text(address), text(channel))  # type: ignore[arg-type]
            return text(nid), recipient, tuple(sorted(text(part) for part in parts))

        return self._run(lookup)

    def settleGatewayId(self, gatewayId: str, delivered: bool = True) -> Deferred[bool]:
        keys = self._keys

        async def settle(client: RedisClient) -> bool:
            answer = await client.eval(
                scripts.SETTLE_GATEWAY_ID,
                [keys.gatewayId(gatewayId)],
                [gatewayId, "1" if delivered else "0", keys.gatewayText(""), keys.gatewayId("")],
            )
            return bool(answer == scripts.DONE)

        return self._run(settle)


async def _clockOffset(connection: Any) -> float:
    """The server's clock minus this process's, in seconds (to half a round trip)."""
    before = time.time()
    seconds, micros = await connection.execute_command("TIME")
    after = time.time()
    return int(seconds) + int(micros) / 1e6 - (before + after) / 2


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d


def _all(deferreds: list[Deferred[Any]]) -> Deferred[list[tuple[bool, Any]]]:
    """Every reply, as (succeeded, value or Failure), once all have come."""
    return DeferredList(deferreds, consumeErrors=True)


_REFUSED_BEFORE_RUNNING = ("NOPERM", "OOM", "READONLY", "NOREPLICAS", "BUSY", "MASTERDOWN")


def _neverSent(error: BaseException | None) -> bool:
    """Whether a command failed before it could be written (no connection to write it on)."""
    cause = getattr(error, "__cause__", None) or error
    return isinstance(cause, txredisapi.ConnectionError) and "Not connected" in str(cause)


async def _exists(client: RedisClient, key: str) -> int:
    return int(await client.command("EXISTS", key))


async def _enqueued(script: Deferred[Any]) -> Any:
    """The ENQUEUE script's answer; an error reply as StoreError saying whether the server
    refused the script before it ran (then nothing is stored: ACL, memory, read-only replica)."""
    try:
        return await script
    except ResponseError as e:
        if str(e).startswith(_REFUSED_BEFORE_RUNNING):
            raise StoreError(f"nothing stored: {e}") from e
        raise StoreError(f"enqueue failed, perhaps stored in part: {e}") from e


def _checkEnqueued(done: Any, notificationKey: str) -> None:
    """Raise what the ENQUEUE script's answer amounts to, if not success."""
    if done == scripts.NO_CREDITS:
        raise InsufficientCredits("the account's SMS credits do not cover the message")
    if done == scripts.EXISTS:
        raise AlreadyExists(f"notification exists already: {notificationKey}")
    if done == scripts.TOO_LATE:
        raise StoreError(f"nothing stored: the enqueue reached the server late: {notificationKey}")
    if done != scripts.DONE:
        raise StoreError(f"unexpected answer to enqueue: {done!r}")
