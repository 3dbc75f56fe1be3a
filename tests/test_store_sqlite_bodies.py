"""
Tests for mailrelay.store.sqlite.bodies: large message bodies in segment files beside the
SQLite file, on their own and through the store. Real files under the trial temp directory.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import mmap
import os
import sqlite3
import zlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import google_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import gatherResults
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailrelay.interfaces import StoreError
from mailrelay.model import MessageText, QueueStats
from mailrelay.store.sqlite import SQLiteStore, workerFile
from mailrelay.store.sqlite.bodies import (
    EXTERNAL_BODY_MIN,
    NATIVE_WRITE_GROUP,
    SEGMENT_SIZE,
    SegmentWriter,
    checksum,
    readBody,
    segmentDirectory,
    sweepSegments,
)
from tests.store_mixin import T0
from tests.test_store_sqlite import (
    SQLiteStoreTestsBase,
    WorkerFileTestsBase,
    databaseAtVersion,
)


def body(size: int, fill: bytes = b"x") -> bytes:
    line = fill * 70 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line))


LARGE = body(100 * 1024)
SMALL = b"Subject: small\r\n\r\nhello\r\n"


class SegmentWriterTestsMixin:
    """Run with plain writes and with O_DIRECT, where each group's write is padded."""

    direct: bool
    mktemp: Callable[[], str]
    addCleanup: Callable[..., None]

    def setUp(self) -> None:
        self.directory = segmentDirectory(Path(self.mktemp()) / "mailrelay.sqlite3")
        self.directory.parent.mkdir(parents=True)
        if self.direct:
            probe = SegmentWriter(self.directory.parent / "probe", direct=True)
            probe.append([b"probe"])
            supported = probe.direct
            probe.close()
            if not supported:
                raise SkipTest("no O_DIRECT on the file system of the temp directory")

    def writer(self, segmentSize: int = SEGMENT_SIZE) -> SegmentWriter:
        writer = SegmentWriter(self.directory, segmentSize, direct=self.direct)
        self.addCleanup(writer.close)
        return writer

    def groupEnd(self, offset: int) -> int:
        """Where the next group starts after one that ended at ``offset``."""
        return -(-offset // 4096) * 4096 if self.direct else offset

    def test_directoryBesideTheDatabase(self) -> None:
        self.assertEqual(
            segmentDirectory(Path("/var/lib/mailrelay/mailrelay.worker-1.sqlite3")),
            Path("/var/lib/mailrelay/mailrelay.worker-1.sqlite3-bodies"),
        )

    def test_appendThenRead(self) -> None:
        writer = self.writer()
        first = writer.append([b"one", b"second body"])
        (third,) = writer.append([b"3"])
        self.assertEqual(writer.direct, self.direct)
        self.assertEqual(
            [(w.segment, w.offset, w.length) for w in [*first, third]],
            [(1, 0, 3), (1, 3, 11), (1, self.groupEnd(14), 1)],
        )
        content = (self.directory / "1").read_bytes()
        self.assertEqual(content[:14], b"onesecond body")
        self.assertEqual(content[self.groupEnd(14) :][:1], b"3")
        self.assertEqual(len(content), self.groupEnd(self.groupEnd(14) + 1))
        self.assertEqual(
            [readBody(self.directory, w) for w in [*first, third]], [b"one", b"second body", b"3"]
        )

    def test_bodiesInPieces(self) -> None:
        """A body handed over in pieces is written whole, its CRC that of the whole."""
        arrived = b"--" + LARGE
        pieces = (b"Received: by x\r\n", memoryview(arrived)[2:], b"", b"end\r\n")
        whole = b"Received: by x\r\n" + LARGE + b"end\r\n"
        first, second = self.writer().append([pieces, b"after"])
        self.assertEqual((first.length, first.crc), (len(whole), google_crc32c.value(whole)))
        self.assertEqual(readBody(self.directory, first), whole)
        self.assertEqual(readBody(self.directory, second), b"after")

    def test_eachWriterStartsANewSegment(self) -> None:
        """A process never appends after what an earlier one left: it may be half-written."""
        (old,) = self.writer().append([b"old"])
        (new,) = self.writer().append([b"new"])
        self.assertEqual((old.segment, new.segment), (1, 2))
        self.assertEqual(readBody(self.directory, old), b"old")

    def test_newSegmentOnceFull(self) -> None:
        writer = self.writer(segmentSize=self.groupEnd(9) + 1)  # 10 plain, 4097 direct
        locations = writer.append([b"12345", b"6789"])  # ends below the size
        locations += writer.append([b"abc"])  # still goes in, and reaches the size
        locations += writer.append([b"defghijkl"]) + writer.append([b"m"])
        self.assertEqual([w.segment for w in locations], [1, 1, 1, 2, 2])
        self.assertEqual(sorted(p.name for p in self.directory.iterdir()), ["1", "2"])
        self.assertEqual(
            [readBody(self.directory, w) for w in locations],
            [b"12345", b"6789", b"abc", b"defghijkl", b"m"],
        )

    def test_manyBodiesInOneGroup(self) -> None:
        bodies = [str(i).encode() * (i % 7 + 1) for i in range(1500)]  # more than one pwritev
        locations = self.writer().append(bodies)
        self.assertEqual([readBody(self.directory, w) for w in locations], bodies)

    def test_groupLargerThanTheBuffer(self) -> None:
        """O_DIRECT goes through a 4 MiB buffer: bodies that overflow it, one bigger than it."""
        bodies = [bytes([65 + i]) * (1_500_000 + i) for i in range(4)] + [b"z" * 5_000_000]
        writer = self.writer()
        locations = writer.append(bodies) + writer.append([b"after"])
        self.assertEqual([readBody(self.directory, w) for w in locations], [*bodies, b"after"])
        # The checksum of a body cut across buffer flushes is still that of the whole body.
        self.assertEqual(
            [(w.crc, w.castagnoli) for w in locations],
            [(google_crc32c.value(b), True) for b in [*bodies, b"after"]],
        )

    def test_writesReturnOnceOnDisk(self) -> None:
        """With O_DIRECT the segment is open with O_DSYNC (each write is durable when it
        returns, no fdatasync after it); plain segments are not (they fdatasync)."""
        writer = self.writer()
        writer.append([b"body"])
        (segment,) = [
            int(fd)
            for fd in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{fd}") == str((self.directory / "1").resolve())
        ]
        flags = fcntl.fcntl(segment, fcntl.F_GETFL)
        self.assertEqual(bool(flags & os.O_DSYNC), self.direct)
        self.assertEqual(bool(flags & os.O_DIRECT), self.direct)

    def test_damagedBody(self) -> None:
        (where,) = self.writer().append([b"hello world"])
        segment = self.directory / "1"
        segment.write_bytes(b"hello World")
        with self.assertRaises(StoreError):
            readBody(self.directory, where)
        segment.write_bytes(b"hello")
        with self.assertRaises(StoreError):
            readBody(self.directory, where)
        segment.unlink()
        with self.assertRaises(StoreError):
            readBody(self.directory, where)

    def test_checksumsOfEitherKind(self) -> None:
        """New bodies carry a CRC-32C; a location with a zlib CRC-32 (rows from before schema
        5) is checked with that, and a CRC of the wrong kind does not pass."""
        (where,) = self.writer().append([b"hello world"])
        self.assertEqual((where.crc, where.castagnoli), (0xC99465AA, True))
        self.assertEqual(checksum(b"hello world", castagnoli=False), zlib.crc32(b"hello world"))
        older = dataclasses.replace(where, crc=zlib.crc32(b"hello world"), castagnoli=False)
        self.assertEqual(readBody(self.directory, older), b"hello world")
        for wrongKind in (
            dataclasses.replace(where, castagnoli=False),
            dataclasses.replace(older, castagnoli=True),
        ):
            with self.assertRaises(StoreError):
                readBody(self.directory, wrongKind)

    def test_cannotWrite(self) -> None:
        """A directory that cannot be made: StoreError, not OSError."""
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"a file where the directory's parent should be")
        writer = SegmentWriter(blocker / "mailrelay.sqlite3-bodies")
        with self.assertRaises(StoreError):
            writer.append([b"body"])

    def test_sweepKeepsReferencedAndNewest(self) -> None:
        writer = self.writer(segmentSize=1)
        for name in (b"a", b"b", b"c", b"d"):
            writer.append([name])
        self.assertEqual(sweepSegments(self.directory, [2]), [1, 3])
        self.assertEqual(sorted(p.name for p in self.directory.iterdir()), ["2", "4"])
        self.assertEqual(sweepSegments(self.directory, []), [2])
        self.assertEqual(sweepSegments(self.directory, []), [])  # the newest stays

    def test_sweepWithoutDirectory(self) -> None:
        self.assertEqual(sweepSegments(self.directory, []), [])


class PlainSegmentWriterTests(SegmentWriterTestsMixin, SynchronousTestCase):
    direct = False


class DirectSegmentWriterTests(SegmentWriterTestsMixin, SynchronousTestCase):
    direct = True

    def setUp(self) -> None:
        super().setUp()
        if NATIVE_WRITE_GROUP is None:
            raise SkipTest("the _mailrelay_segments extension is not built here")

    def test_nativeByDefault(self) -> None:
        self.assertIs(self.writer()._writeGroup, NATIVE_WRITE_GROUP)


class DirectSegmentWriterInPythonTests(SegmentWriterTestsMixin, SynchronousTestCase):
    """Where the extension is missing: google-crc32c, a slice copy and os.pwritev."""

    direct = True

    def writer(self, segmentSize: int = SEGMENT_SIZE) -> SegmentWriter:
        writer = SegmentWriter(self.directory, segmentSize, direct=True, writeGroup=None)
        self.addCleanup(writer.close)
        return writer


_pieces = st.lists(st.lists(st.binary(max_size=5000), max_size=4).map(tuple), max_size=6)


class NativeWriteGroupTests(SynchronousTestCase):
    """``_mailrelay_segments.write_group`` writes what the Python version writes, with
    google-crc32c's checksums, through a buffer it flushes whenever it is full."""

    def setUp(self) -> None:
        if NATIVE_WRITE_GROUP is None:
            raise SkipTest("the _mailrelay_segments extension is not built here")
        self.writeGroup = NATIVE_WRITE_GROUP
        self.buffer = mmap.mmap(-1, 8192)  # small: most groups below fill it several times
        self.addCleanup(self.buffer.close)
        self.path = Path(self.mktemp())
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, self.fd)

    @given(bodies=_pieces, position=st.sampled_from([0, 4096, 12288]))
    @settings(max_examples=300, deadline=None)
    def test_agreesWithGoogleCrc32c(self, bodies: list[tuple[bytes, ...]], position: int) -> None:
        os.ftruncate(self.fd, 0)
        views = [tuple(memoryview(b"-" + piece)[1:] for piece in body) for body in bodies]
        crcs, end = self.writeGroup(self.fd, self.buffer, position, 4096, views)
        wholes = [b"".join(body) for body in bodies]
        self.assertEqual(crcs, [google_crc32c.value(whole) for whole in wholes])
        written = b"".join(wholes)
        self.assertEqual(end, position + -(-len(written) // 4096) * 4096)
        content = os.pread(self.fd, end - position + 1, position)
        self.assertEqual(content, written + bytes(end - position - len(written)))

    def test_refusesWhatItCannotDo(self) -> None:
        self.assertRaises(ValueError, self.writeGroup, self.fd, self.buffer, 0, 3000, [])
        self.assertRaises(TypeError, self.writeGroup, self.fd, b"read-only", 0, 4096, [])
        self.assertRaises(TypeError, self.writeGroup, self.fd, self.buffer, 0, 4096, [(42,)])
        self.assertRaises(TypeError, self.writeGroup, self.fd, self.buffer, 0, 4096, [7])

    def test_writeErrors(self) -> None:
        """A failed write is an OSError with its errno (the store makes it a StoreError)."""
        readOnly = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, readOnly)
        with self.assertRaises(OSError) as caught:
            self.writeGroup(readOnly, self.buffer, 0, 4096, [(b"body",)])
        self.assertEqual(caught.exception.errno, errno.EBADF)


def messageRows(path: Path) -> dict[int, tuple[bytes, int | None]]:
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute("SELECT notification_id, body, body_segment FROM messages")
        return {number: (bytes(stored), segment) for number, stored, segment in rows}
    finally:
        connection.close()


class StoreBodiesTests(SQLiteStoreTestsBase):
    """Through the store: a large body goes to a segment, a small one stays in its row."""

    async def enqueueBody(self, message: MessageText, store: SQLiteStore | None = None) -> str:
        store = store or self.store
        notification = self.notification()
        await store.enqueue(notification, message)
        return notification.notification_id

    async def claimedBodies(self, store: SQLiteStore | None = None) -> dict[str, bytes]:
        entries = await (store or self.store).claimDue(100, leaseSeconds=60)
        return {e.notification.notification_id: e.message for e in entries}

    async def test_largeInSegmentSmallInRow(self) -> None:
        large = await self.enqueueBody(LARGE)
        atLimit = await self.enqueueBody(body(EXTERNAL_BODY_MIN)[:EXTERNAL_BODY_MIN])
        small = await self.enqueueBody(SMALL)
        rows = messageRows(self.store.path)
        self.assertEqual(rows[int(large)], (b"", 1))
        self.assertEqual(rows[int(atLimit)], (b"", 1))
        self.assertEqual(rows[int(small)], (SMALL, None))
        self.assertIn(LARGE, (segmentDirectory(self.store.path) / "1").read_bytes())
        self.assertEqual(
            await self.claimedBodies(),
            {large: LARGE, atLimit: body(EXTERNAL_BODY_MIN)[:EXTERNAL_BODY_MIN], small: SMALL},
        )

    async def test_largeInPieces(self) -> None:
        """The pieces of a large message go to its segment, not joined first."""
        arrived = b"--" + LARGE
        nid = await self.enqueueBody((b"Received: by x\r\n", memoryview(arrived)[2:]))
        self.assertEqual(messageRows(self.store.path)[int(nid)], (b"", 1))
        self.assertEqual(await self.claimedBodies(), {nid: b"Received: by x\r\n" + LARGE})

    async def test_oneGroupOfMixedSizes(self) -> None:
        messages = [body(40_000 + i * 1000, bytes([97 + i])) if i % 2 else SMALL for i in range(12)]
        notifications = [self.notification() for _ in messages]
        commits = self.store.commits
        await gatherResults(
            [self.store.enqueue(n, m) for n, m in zip(notifications, messages, strict=True)]
        )
        self.assertLess(self.store.commits - commits, len(messages))  # grouped
        expected = {n.notification_id: m for n, m in zip(notifications, messages, strict=True)}
        self.assertEqual(await self.claimedBodies(), expected)

    async def test_bodiesOfEarlierRuns(self) -> None:
        path = self.store.path
        first = await self.enqueueBody(LARGE)
        await self.store.close()
        store = await self.openStore(path)
        second = await self.enqueueBody(body(50_000, b"y"), store)
        self.assertEqual(messageRows(path)[int(second)][1], 2)  # a new segment
        self.assertEqual(
            await self.claimedBodies(store), {first: LARGE, second: body(50_000, b"y")}
        )

    async def test_damagedBodyStaysQueued(self) -> None:
        """A body whose CRC does not match is not handed out, nor does it hold up the rest."""
        damaged = await self.enqueueBody(LARGE)
        healthy = await self.enqueueBody(body(60_000, b"h"))
        segment = segmentDirectory(self.store.path) / "1"
        content = bytearray(segment.read_bytes())
        content[5000] ^= 1
        segment.write_bytes(bytes(content))
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(await self.claimedBodies(), {healthy: body(60_000, b"h")})
        self.assertEqual(await self.store.stats(), QueueStats(queued=1, deferred=0, in_flight=1))
        errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn(f"notification {damaged} left queued", errors[0])
        self.assertIn("damaged", errors[0])

    async def test_expireDeletesSegmentsNoLongerNeeded(self) -> None:
        path = self.store.path
        directory = segmentDirectory(path)
        finished = await self.enqueueBody(LARGE)
        await self.store.close()
        self.store = await self.openStore(path)  # the next body goes to segment 2
        kept = await self.enqueueBody(LARGE)
        await self.store.close()
        self.store = await self.openStore(path)
        last = await self.enqueueBody(LARGE)  # segment 3, the newest
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["1", "2", "3"])
        before = T0 + timedelta(days=1)
        self.assertEqual(await self.store.expire(before), 0)  # all still queued
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["1", "2", "3"])

        await self.finishDelivery(finished)
        await self.finishDelivery(last)
        self.assertEqual(await self.store.expire(before), 2)
        # 1: nothing refers to it; 2: the queued one's body; 3: the newest, kept.
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["2", "3"])
        self.assertEqual(await self.claimedBodies(), {kept: LARGE})

    async def test_finishDeletesASegmentNoLongerNeeded(self) -> None:
        """The last body of a segment that is not the newest: once its notification is
        finished (or deleted from the queue), the segment goes at once."""
        path = self.store.path
        directory = segmentDirectory(path)
        first = await self.enqueueBody(LARGE)
        second = await self.enqueueBody(LARGE)  # the same segment, 1
        await self.store.close()
        self.store = await self.openStore(path)
        newest = await self.enqueueBody(LARGE)  # segment 2
        await self.finishDelivery(first)
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["1", "2"])
        await self.store.deleteQueued(second, "deleted", T0)
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["2"])
        await self.finishDelivery(newest)  # the newest stays, for the next bodies
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["2"])

    async def test_upgradedDatabaseKeepsItsBodies(self) -> None:
        """A file made before segments existed: its bodies are in the rows, and stay there."""
        path = self.databasePath()
        old = databaseAtVersion(path, 2)
        old.execute(
            "INSERT INTO notifications (id, account, sender, size, received_at, "
            "notify_content_type) VALUES (7, 'acme', 'a@acme.example', 1, 0, 'text/plain')"
        )
        old.execute("INSERT INTO messages (notification_id, body) VALUES (7, ?)", (LARGE,))
        old.execute(
            "INSERT INTO queue (notification_id, state, next_attempt) VALUES (7, 'queued', 0)"
        )
        old.close()
        store = self.store = await self.openStore(path)
        new = await self.enqueueBody(LARGE)
        self.assertEqual(await self.claimedBodies(store), {"7": LARGE, new: LARGE})

    async def test_bodiesWithCrc32FromSchema4(self) -> None:
        """A file of schema version 4: its segment bodies carry a zlib CRC-32 (body_crc) and
        are read and checked with it; a damaged one is still caught; new bodies beside them
        get a CRC-32C (body_crc32c)."""
        path = self.databasePath()
        old = databaseAtVersion(path, 4)
        directory = segmentDirectory(path)
        directory.mkdir()
        damaged = body(40_000, b"d")
        (directory / "1").write_bytes(LARGE + damaged[:-1] + b"!")
        for number, offset, content in [(7, 0, LARGE), (8, len(LARGE), damaged)]:
            old.execute(
                "INSERT INTO notifications (id, account, sender, size, received_at, "
                "notify_content_type, recipient_list) VALUES (?, 'acme', 'a@acme.example', 1, "
                "0, 'text/plain', '[]')",
                (number,),
            )
            old.execute(
                "INSERT INTO messages (notification_id, body, body_segment, body_offset, "
                "body_length, body_crc) VALUES (?, x'', 1, ?, ?, ?)",
                (number, offset, len(content), zlib.crc32(content)),
            )
            old.execute(
                "INSERT INTO queue (notification_id, state, next_attempt) VALUES (?, 'queued', 0)",
                (number,),
            )
        old.close()
        store = self.store = await self.openStore(path)
        new = await self.enqueueBody(LARGE)
        self.assertEqual(await self.claimedBodies(store), {"7": LARGE, new: LARGE})  # not 8
        check = sqlite3.connect(path)
        self.addCleanup(check.close)
        self.assertEqual(
            check.execute(
                "SELECT body_crc, body_crc32c FROM messages WHERE notification_id = ?", (int(new),)
            ).fetchone(),
            (None, google_crc32c.value(LARGE)),
        )


class WorkerBodiesTests(WorkerFileTestsBase):
    """A worker writes the bodies of what it accepts beside its own file; any process reads them."""

    async def test_workerSegments(self) -> None:
        notification = self.notification()
        await self.store.enqueue(notification, LARGE)
        self.assertTrue((segmentDirectory(workerFile(self.main.path, 1)) / "1").exists())
        self.assertFalse(segmentDirectory(self.main.path).exists())
        (entry,) = await self.main.claimDue(10, leaseSeconds=60)
        self.assertEqual((entry.notification, entry.message), (notification, LARGE))
