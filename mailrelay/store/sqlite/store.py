"""
The embedded store: everything mailrelay keeps, in SQLite files (WAL mode, fsync on commit), but
for message bodies of ``EXTERNAL_BODY_MIN`` or more, which go to segment files beside them
(:mod:`~mailrelay.store.sqlite.bodies`) and are on disk before their rows commit.

:class:`SQLiteStore` is the one :class:`~mailrelay.interfaces.IStore` of this backend, made of
parts that each hold the methods of one concern, in a module of its own with the work those
methods run on the database threads; all of them share the same files and threads:

- :mod:`~mailrelay.store.sqlite.files`: the main file and the workers' files, the reader and
  writer threads over them, and which file holds a notification;
- :mod:`~mailrelay.store.sqlite.accounts`: accounts, API keys, senders, DKIM keys, webhook
  secrets and shared keys, in the main file, lookups remembered for a moment
  (:class:`~mailrelay.store.cache.AccountCache`);
- :mod:`~mailrelay.store.sqlite.queue`: the intake (enqueue, with SMS credits) and its counts;
- :mod:`~mailrelay.store.sqlite.delivery`: claims, leases, outcomes and the operator's changes;
- :mod:`~mailrelay.store.sqlite.trails`: notifications, status trails, bulks and expiry;
- :mod:`~mailrelay.store.sqlite.reports` and :mod:`~mailrelay.store.sqlite.gatewayids`: the
  report outbox and the SMS gateways' message ids.

Every failure reaches the caller as :class:`~mailrelay.interfaces.StoreError` (or its
AlreadyExists / NotFound subclasses), never as a raw ``sqlite3`` exception.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.ids import NotificationIdGenerator
from mailrelay.interfaces import IStore
from mailrelay.store.cache import AccountCache
from mailrelay.store.sqlite.delivery import DeliveryQueue
from mailrelay.store.sqlite.files import BUSY_TIMEOUT, StoreFiles
from mailrelay.store.sqlite.gatewayids import GatewayIds
from mailrelay.store.sqlite.queue import Intake
from mailrelay.store.sqlite.reports import ReportOutbox
from mailrelay.store.sqlite.trails import StatusTrails


@implementer(IStore)
class SQLiteStore(Intake, DeliveryQueue, StatusTrails, ReportOutbox, GatewayIds):
    """
    The SQLite backend of :class:`~mailrelay.interfaces.IStore`, in the file ``path``: the
    intake with the account data (:class:`~mailrelay.store.sqlite.queue.Intake`, which is an
    :class:`~mailrelay.store.sqlite.accounts.AccountData`), the delivery queue, the status
    trails, the report outbox and the gateway ids, over one
    :class:`~mailrelay.store.sqlite.files.StoreFiles`.

    ``reactor`` must run threads and tell time (the real reactor); ``instanceId`` goes into the
    notification ids (see :mod:`mailrelay.ids`); ``groupLimit`` caps how many writes share one
    commit; ``busyTimeout`` is how long to wait for another process's lock; ``home``, the file
    this process's enqueues go to (default: ``path``, the main file; a worker's: see
    :func:`~mailrelay.store.sqlite.files.workerFile`); ``deliveringWorkers``, in the main
    process, how many workers deliver from their own files, which its claims leave to them
    (:meth:`~mailrelay.store.sqlite.files.StoreFiles.claimFiles`). Call :meth:`open` first and
    :meth:`close` last. With ``inlineReads`` (a process that serves only reads) the reads run
    on the reactor thread itself (:class:`~mailrelay.store.sqlite.threads.InlineReader`).
    ``commits`` counts the write transactions committed so far;
    ``expireBatch`` is how many notifications one expiry write looks at.

    Accounts, API keys and senders are read on every login and every new session, and change
    rarely: lookups of them are remembered for ``ACCOUNT_CACHE_SECONDS``. This process's own
    changes clear what is remembered at once; another process's (the admin command line's)
    are seen within that time.
    """

    name = "sqlite"
    log = Logger()

    def __init__(
        self,
        path: Path,
        reactor: Any,
        instanceId: int = 0,
        groupLimit: int = 256,
        busyTimeout: float = BUSY_TIMEOUT,
        home: Path | None = None,
        deliveringWorkers: int = 0,
        inlineReads: bool = False,
    ) -> None:
        self.path = Path(path)
        self.home = Path(home) if home is not None else self.path
        self._files = StoreFiles(
            self.path, self.home, reactor, groupLimit, busyTimeout, deliveringWorkers, inlineReads
        )
        self._accountCache = AccountCache(reactor)
        self._newId = NotificationIdGenerator(instanceId, reactor.seconds)

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r}>"

    @property
    def commits(self) -> int:
        """How many write transactions have been committed (fsync'd) since :meth:`open`."""
        return self._files.writer.commits

    def notificationFiles(self) -> list[Path]:
        """Every file notifications may be in: the main file, then the workers' files that
        exist, in worker order."""
        return self._files.notificationFiles()

    async def _open(self) -> None:
        await self._files.open()
        self.log.info("sqlite store open: {path}", path=str(self.path))

    def open(self) -> Deferred[None]:
        """Open (creating or upgrading) the database. Returns Deferred[None]."""
        return Deferred.fromCoroutine(self._open())

    def close(self) -> Deferred[None]:
        """Finish every write already asked for, then close. Returns Deferred[None]."""
        return Deferred.fromCoroutine(self._files.close())

    def ping(self) -> Deferred[float]:
        """Round trip through the reader thread, to every file (an unreadable worker file
        fails it, as it fails the reads). Returns Deferred[float] (seconds)."""
        started = time.perf_counter()
        d = self._files.reader.submitEach(lambda c: c.execute("SELECT 1").fetchone())
        return d.addCallback(lambda _: time.perf_counter() - started)
