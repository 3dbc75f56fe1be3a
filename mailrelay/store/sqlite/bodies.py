"""
Large message bodies, kept out of the SQLite file in append-only segment files beside it.

A body of ``EXTERNAL_BODY_MIN`` octets or more is not stored in its ``messages`` row: SQLite
would write it twice (a WAL frame per 4 KiB page, then the checkpoint's copy into the database,
reading the WAL back), a system call per page each time. Instead the writer thread appends the
bodies of a whole commit group to the current segment with one write per 4 MiB that returns
once the bytes are on disk (``O_DIRECT`` with ``O_DSYNC``; where the file system refuses
``O_DIRECT``, plain writes and an ``fdatasync``), and only then inserts the rows, which say
where each body is (segment, offset, length) and its checksum. A body is therefore on disk
before the row that points at it commits; a crash in between leaves only unreferenced bytes in
a segment.

The segments of the database file ``mailrelay.sqlite3`` are ``mailrelay.sqlite3-bodies/N``,
``N`` counting up. Only the process whose home file that is writes to them, always to the
newest, which it makes when it first needs one and again once the current one is
``SEGMENT_SIZE`` or larger. A segment is deleted (:func:`sweepSegments`) when no row refers to
it any more and it is not the newest.

The work functions at the end are the ``messages`` rows' side, run on a database thread: a
notification's body from its row or its segment (:func:`messageBody`), deleting it
(:func:`dropBody`) and the segments no row needs any more (:func:`sweepSegment`,
:func:`sweepUnreferenced`).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c

from mailrelay.interfaces import StoreError
from mailrelay.model import MessageText, joinText, textPieces
from mailrelay.store.sqlite.statements import inChunks, withList

WriteGroup = Callable[
    [int, mmap.mmap, int, int, Sequence[tuple[bytes | memoryview, ...]]], tuple[list[int], int]
]
"""``(fd, buffer, position, alignment, bodies)``: copy the bodies (each in pieces) through
``buffer`` to ``fd`` at ``position``, the last write padded to ``alignment``; each body's
CRC-32C and where the written bytes end."""

try:
    from _mailrelay_segments import write_group as NATIVE_WRITE_GROUP
except ImportError:  # not built, or no CRC-32C instruction: google-crc32c, a slice copy, pwritev
    NATIVE_WRITE_GROUP = None

EXTERNAL_BODY_MIN = 32 * 1024
"""Bodies this large or larger go to segment files; smaller ones stay in their row, where one
more fsync per commit would cost more than SQLite's page writes save."""
SEGMENT_SIZE = 64 * 1024 * 1024
"""A new segment is started once the current one is at least this large."""
_MOST_BUFFERS_PER_WRITE = 512  # under every platform's IOV_MAX (1024 on Linux)
_DIRECT_ALIGNMENT = 4096  # O_DIRECT writes: offset, length and memory aligned to this
_DIRECT_BUFFER = 4 * 1024 * 1024


CASTAGNOLI = google_crc32c.implementation == "c"
"""Whether new bodies get a CRC-32C (Castagnoli), which google-crc32c computes with the CPU's
CRC instruction: about 4 us per 100 KiB here, against 21 us for zlib's CRC-32 (under the
benchmark's load the difference was 0.3 ms of the writer's 2.5 ms per group, and up to 8 %
more 100 KiB messages a second). Where the package has only its pure-Python fallback, which would
be far slower, new bodies get zlib's CRC-32 instead; either kind is read back."""


@dataclass(frozen=True)
class BodyLocation:
    """Where one body is: ``length`` octets at ``offset`` in segment ``segment``, whose
    checksum is ``crc``: a CRC-32C if ``castagnoli``, else a CRC-32 (zlib's; bodies written
    before schema version 5, or where there is no fast CRC-32C)."""

    segment: int
    offset: int
    length: int
    crc: int
    castagnoli: bool = True


def checksum(body: bytes, castagnoli: bool = CASTAGNOLI) -> int:
    """The CRC-32C (``castagnoli``) or CRC-32 of ``body``."""
    return google_crc32c.value(body) if castagnoli else zlib.crc32(body)


def segmentDirectory(databaseFile: Path | str) -> Path:
    """The directory of the segments that belong to the SQLite file ``databaseFile``."""
    path = Path(databaseFile)
    return path.with_name(path.name + "-bodies")


def _segmentNumbers(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(name) for name in names if name.isascii() and name.isdigit())


def _syncDirectory(directory: Path) -> None:
    """Make the directory's entries (a new file, a new subdirectory) survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentWriter:
    """
    Appends bodies to the segments in ``directory``. Used by one thread only (the writer of the
    SQLite file the directory belongs to); the first write of a process starts a new segment, so
    it never appends after what an earlier run may have left half-written.

    Where the file system allows it (``direct``: None, try), segments are written with
    ``O_DIRECT``: the bodies are copied into one aligned buffer and go to the disk from there,
    not through the page cache, whose per-page work costs the writer thread more than the copy
    (and nothing reads them back soon). Each group's write is padded to 4 KiB, so a group's
    bodies start on a boundary. Elsewhere (tmpfs, say) they are written plainly.
    ``writeGroup`` does that for a whole group (the native one, where it was built: one call
    that lets go of the GIL once; None: in Python, with google-crc32c).
    """

    def __init__(
        self,
        directory: Path,
        segmentSize: int = SEGMENT_SIZE,
        direct: bool | None = None,
        writeGroup: WriteGroup | None = NATIVE_WRITE_GROUP,
    ) -> None:
        self.directory = directory
        self._segmentSize = segmentSize
        self._direct = direct
        self._writeGroup = writeGroup
        self._buffer: mmap.mmap | None = None
        self._fd: int | None = None
        self._segment = 0
        self._end = 0

    @property
    def direct(self) -> bool:
        """Whether the current segment is written with O_DIRECT."""
        return bool(self._direct) and self._fd is not None

    def append(self, bodies: Sequence[MessageText]) -> list[BodyLocation]:
        """Write ``bodies`` (each whole or in pieces) one after another and wait until they are
        on disk; where each is."""
        try:
            if self._fd is None or self._end >= self._segmentSize:
                self._startSegment()
            assert self._fd is not None
            if self._direct:
                locations, end = self._writeDirect(bodies)
            else:
                locations, end = self._writePlain(bodies)
                os.fdatasync(self._fd)
        except OSError as e:
            # What was written may be partly on disk: no row will point at it, and the next
            # write goes to a new segment rather than after bytes of unknown state.
            self._closeSegment()
            raise StoreError(f"sqlite store: cannot write message bodies: {e}") from e
        self._end = end
        return locations

    def _writePlain(self, texts: Sequence[MessageText]) -> tuple[list[BodyLocation], int]:
        assert self._fd is not None
        bodies = [joinText(text) for text in texts]
        locations = []
        offset = self._end
        for body in bodies:
            crc = checksum(body)
            locations.append(BodyLocation(self._segment, offset, len(body), crc, CASTAGNOLI))
            offset += len(body)
        for start in range(0, len(bodies), _MOST_BUFFERS_PER_WRITE):
            chunk = bodies[start : start + _MOST_BUFFERS_PER_WRITE]
            _writeAll(self._fd, chunk, locations[start].offset)
        return locations, offset

    def _writeDirect(self, bodies: Sequence[MessageText]) -> tuple[list[BodyLocation], int]:
        """
        Write ``bodies`` from the current end through the aligned buffer; where each is, and
        the new end (the last piece padded to the alignment). The file is open with
        ``O_DSYNC``: each write returns once it is on disk, so no ``fdatasync`` follows.

        Where ``_mailrelay_segments`` was built (and the CPU has a CRC-32C instruction), all of
        this is one native call (``writeGroup``) that lets the reactor thread run meanwhile.
        Elsewhere each body's checksum is taken just before it is copied: the copy then reads
        it from the CPU's cache, so the body (which the reactor thread wrote, on another core)
        is read from memory once (a body in pieces is joined for google-crc32c first, which
        takes only bytes).
        """
        assert self._fd is not None
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, _DIRECT_BUFFER)  # page-aligned memory
        groups = [textPieces(body) for body in bodies]
        if self._writeGroup is not None:
            crcs, end = self._writeGroup(
                self._fd, self._buffer, self._end, _DIRECT_ALIGNMENT, groups
            )
            castagnoli = True
        else:
            crcs, end = self._writeGroupInPython(groups)
            castagnoli = CASTAGNOLI
        locations = []
        offset = self._end
        for pieces, crc in zip(groups, crcs, strict=True):
            length = sum(map(len, pieces))
            locations.append(BodyLocation(self._segment, offset, length, crc, castagnoli))
            offset += length
        return locations, end

    def _writeGroupInPython(
        self, groups: Sequence[tuple[bytes | memoryview, ...]]
    ) -> tuple[list[int], int]:
        """What the native ``writeGroup`` does, for where it is missing."""
        assert self._fd is not None and self._buffer is not None
        buffer, start, filled = self._buffer, self._end, 0
        crcs = []
        for pieces in groups:
            crcs.append(checksum(joinText(pieces)))
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    count = min(len(view), _DIRECT_BUFFER - filled)
                    buffer[filled : filled + count] = view[:count]
                    filled, view = filled + count, view[count:]
                    if filled == _DIRECT_BUFFER:
                        _writeAll(self._fd, [buffer], start)
                        start, filled = start + filled, 0
        if filled:
            padded = -(-filled // _DIRECT_ALIGNMENT) * _DIRECT_ALIGNMENT
            with memoryview(buffer)[:padded] as piece:
                _writeAll(self._fd, [piece], start)
            start += padded
        return crcs, start

    def _startSegment(self) -> None:
        self._closeSegment()
        created = not self.directory.exists()
        self.directory.mkdir(mode=0o700, exist_ok=True)
        if created:
            _syncDirectory(self.directory.parent)
        numbers = _segmentNumbers(self.directory)
        self._segment = (numbers[-1] + 1) if numbers else 1
        path = self.directory / str(self._segment)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if self._direct is not False and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, flags | os.O_DIRECT | os.O_DSYNC, 0o600)
                self._direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False  # not on this file system: plain writes from now on
                flags &= ~os.O_EXCL  # the refused open may have made the file already
        if self._fd is None:
            self._fd = os.open(path, flags, 0o600)
        self._end = 0
        _syncDirectory(self.directory)

    def _closeSegment(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def close(self) -> None:
        self._closeSegment()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


def _writeAll(fd: int, buffers: Sequence[bytes | memoryview | mmap.mmap], position: int) -> None:
    written = os.pwritev(fd, buffers, position)
    if written < sum(map(len, buffers)):
        # A short write (a signal, a disk about to be full): the rest, until done or an error
        # (with O_DIRECT, a rest that is not aligned is refused: an error, and a new segment).
        rest = memoryview(b"".join(buffers))[written:]
        position += written
        while rest:
            count = os.pwrite(fd, rest, position)
            rest, position = rest[count:], position + count


def readBody(directory: Path, location: BodyLocation) -> bytes:
    """The body at ``location``; StoreError if it cannot be read whole or its CRC is wrong."""
    path = directory / str(location.segment)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StoreError(f"sqlite store: cannot open {str(path)!r}: {e}") from e
    try:
        body = os.pread(fd, location.length, location.offset)
    except OSError as e:
        raise StoreError(f"sqlite store: cannot read {str(path)!r}: {e}") from e
    finally:
        os.close(fd)
    if len(body) != location.length or checksum(body, location.castagnoli) != location.crc:
        raise StoreError(f"sqlite store: the body at {location.offset} in {str(path)!r} is damaged")
    return body


def sweepSegments(directory: Path, referenced: Iterable[int]) -> list[int]:
    """
    Delete the segments in ``directory`` that no row refers to, except the newest (which its
    writer may be appending to); returns the numbers deleted.

    Call it inside a write transaction on the segments' SQLite file, listing ``referenced``
    in that transaction: the writer cannot then commit a row pointing at a segment this sees
    as unreferenced (it only writes to the newest segment, which is kept).
    """
    numbers = _segmentNumbers(directory)
    keep = set(referenced)
    deleted = []
    for number in numbers[:-1]:
        if number not in keep:
            (directory / str(number)).unlink(missing_ok=True)
            deleted.append(number)
    return deleted


# The messages rows' side, on a database thread.


def messageBody(connection: sqlite3.Connection, number: int) -> bytes:
    """The message body of notification ``number``: from its row, or from its segment file."""
    row = connection.execute(
        "SELECT body, body_segment, body_offset, body_length, body_crc, body_crc32c "
        "FROM messages WHERE notification_id = ?",
        (number,),
    ).fetchone()
    return _bodyOf(connection, row)


_BODIES = (
    "SELECT json_group_array(json_array(notification_id, length(body), body_segment, "
    "body_offset, body_length, body_crc, body_crc32c)), CAST(group_concat(body, '') AS BLOB) "
    "FROM messages WHERE notification_id IN (?*)"
)
"""The rows in one step (see statements.py): the bodies kept in the rows one after another in
one BLOB (group_concat copies a BLOB's bytes as they are), each one's length and the other
columns in one JSON value, in the same order."""


def messageBodies(
    connection: sqlite3.Connection, numbers: Sequence[int]
) -> dict[int, bytes | StoreError]:
    """The message bodies of the notifications ``numbers`` (one query), each or why it
    cannot be read; a notification without a body is left out."""
    bodies: dict[int, bytes | StoreError] = {}
    for chunk in inChunks(numbers):
        rows, inRows = connection.execute(withList(_BODIES, chunk), chunk).fetchone()
        inRows, start = inRows or b"", 0
        for number, length, *segmentColumns in json.loads(rows):
            inRow = inRows[start : start + (length or 0)]
            start += length or 0
            try:
                bodies[number] = _bodyOf(connection, [inRow, *segmentColumns])
            except StoreError as e:
                bodies[number] = e
    return bodies


def _bodyOf(connection: sqlite3.Connection, row: Sequence[Any]) -> bytes:
    body, segment, offset, length, crc, crc32c = row
    if segment is None:
        return bytes(body)
    castagnoli = crc32c is not None
    where = BodyLocation(segment, offset, length, crc32c if castagnoli else crc, castagnoli)
    return readBody(_segmentsOf(connection), where)


def dropBody(connection: sqlite3.Connection, number: int) -> int | None:
    """Delete notification ``number``'s body. Returns its segment if no other row refers to
    it now (None: the body was in its row, or the segment is still needed)."""
    rows = connection.execute(
        "DELETE FROM messages WHERE notification_id = ? RETURNING body_segment", (number,)
    ).fetchall()
    if not rows or rows[0][0] is None:
        return None
    (segment,) = rows[0]
    stillNeeded = connection.execute(
        "SELECT 1 FROM messages WHERE body_segment = ? LIMIT 1", (segment,)
    ).fetchone()
    return None if stillNeeded else int(segment)


def sweepUnreferenced(connection: sqlite3.Connection) -> None:
    """Delete the body segments no row needs any more (delivered or expired messages')."""
    sweepSegments(_segmentsOf(connection), _referencedSegments(connection))


def sweepSegment(connection: sqlite3.Connection, segment: int) -> None:
    """Delete body segment ``segment`` if no row refers to it (any more) and it is not the
    newest (see :func:`sweepSegments`)."""
    if connection.execute(
        "SELECT 1 FROM messages WHERE body_segment = ? LIMIT 1", (segment,)
    ).fetchone():
        return
    sweepUnreferenced(connection)


def _referencedSegments(connection: sqlite3.Connection) -> list[int]:
    """The segments some row refers to: one step down messages_by_segment per segment, not
    a read of every message's entry."""
    found: list[int] = []
    segment = -1
    while True:
        (segment,) = connection.execute(
            "SELECT MIN(body_segment) FROM messages WHERE body_segment IS NOT NULL "
            "AND body_segment > ?",
            (segment,),
        ).fetchone()
        if segment is None:
            return found
        found.append(segment)


def _segmentsOf(connection: sqlite3.Connection) -> Path:
    """The segment directory of the database file ``connection`` is open on."""
    for _, name, file in connection.execute("PRAGMA database_list"):
        if name == "main":
            return segmentDirectory(file)
    raise StoreError("sqlite store: the connection has no main database")
