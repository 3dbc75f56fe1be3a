"""Tests for mailrelay.smtp.data: the bulk DATA reader."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailrelay.smtp import replies
from mailrelay.smtp.data import (
    NATIVE_SCAN,
    SPOOL_IN_MEMORY,
    DataReader,
    Spool,
    findDotLine,
    pyFindDotLine,
    pyLineProblem,
)


def stuff(message: bytes) -> bytes:
    """Dot-stuff a CRLF message as a client would, and add the end marker."""
    lines = message.split(b"\r\n")[:-1] if message else []
    out = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return out + b".\r\n"


def feedAll(reader: DataReader, chunks: list[bytes]) -> bytes | None:
    for i, chunk in enumerate(chunks):
        rest = reader.feed(chunk)
        if rest is not None:
            return rest + b"".join(chunks[i + 1 :])
    return None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for point in points:
        chunks.append(data[last:point])
        last = point
    chunks.append(data[last:])
    return chunks


_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_dotted = st.one_of(_line, _line.map(lambda b: b"." + b), st.just(b"."), st.just(b".."))


def referenceOutcome(data: bytes, maxLine: int) -> tuple[bytes, bool, bytes] | None:
    """What reading ``data`` (everything after DATA's 354) must give, worked out the simple
    way on the whole input: None if it has no end marker, else (the message, whether it is
    refused for a bare CR or LF or a line over ``maxLine`` octets without its CRLF, what
    follows the end marker)."""
    wire = b"\r\n" + data
    end = wire.find(b"\r\n.\r\n")
    if end < 0:
        return None
    lines = wire[2 : end + 2].split(b"\r\n")[:-1]
    refused = any(b"\r" in line or b"\n" in line or len(line) > maxLine for line in lines)
    message = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return message, refused, wire[end + 5 :]


def _openFileSizesUnder(directory: Path) -> list[int]:
    """The sizes of the files this process has open under ``directory`` (deleted ones too)."""
    sizes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory.resolve())):
                sizes.append(os.stat(f"/proc/self/fd/{fd}").st_size)
        except FileNotFoundError:
            pass  # the listing's own descriptor, closed by now
    return sizes


class DataReaderTests(SynchronousTestCase):
    def reader(self, maxSize: int = 10_000, maxLine: int = 1000) -> DataReader:
        reader = DataReader(maxSize, maxLine)
        self.addCleanup(reader.close)
        return reader

    def test_simpleMessage(self) -> None:
        reader = self.reader()
        rest = reader.feed(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        self.assertEqual(rest, b"QUIT\r\n")
        self.assertIsNone(reader.refusal)
        self.assertEqual(reader.message(), b"Subject: hi\r\n\r\nbody\r\n")

    def test_emptyMessage(self) -> None:
        reader = self.reader()
        self.assertEqual(reader.feed(b".\r\n"), b"")
        self.assertEqual(reader.message(), b"")

    def test_dotStuffingUndone(self) -> None:
        reader = self.reader()
        reader.feed(b"..leading\r\nmid.dle\r\n...\r\n.x\r\n.\r\n")
        self.assertEqual(reader.message(), b".leading\r\nmid.dle\r\n..\r\nx\r\n")

    def test_endMarkerSplitAcrossChunks(self) -> None:
        for cut in range(1, 8):
            data = b"line\r\n.\r\nNOOP\r\n"
            reader = self.reader()
            self.assertEqual(feedAll(reader, [data[:cut], data[cut:]]), b"NOOP\r\n")
            self.assertEqual(reader.message(), b"line\r\n")

    def test_bareLineFeedDoesNotEndMessage(self) -> None:
        """SMTP smuggling: LF . CRLF, CR . CR, LF . LF are not the end of data."""
        for fake in (b"\n.\r\n", b"\r.\r", b"\n.\n", b"\r\n.\n", b"\r.\r\n"):
            reader = self.reader()
            rest = reader.feed(b"a" + fake + b"MAIL FROM:<evil@x>\r\n")
            self.assertIsNone(rest, fake)
            self.assertEqual(reader.feed(b"\r\n.\r\n"), b"")
            self.assertEqual(reader.refusal, replies.BARE_LINE_ENDING, fake)

    def test_bareCRAcrossChunks(self) -> None:
        reader = self.reader()
        reader.feed(b"abc\r")
        reader.feed(b"def\r\n")
        reader.feed(b".\r\n")
        self.assertEqual(reader.refusal, replies.BARE_LINE_ENDING)

    def test_crlfSplitAcrossChunksIsFine(self) -> None:
        reader = self.reader()
        reader.feed(b"abc\r")
        reader.feed(b"\ndef\r\n.\r")
        self.assertEqual(reader.feed(b"\n"), b"")
        self.assertIsNone(reader.refusal)
        self.assertEqual(reader.message(), b"abc\r\ndef\r\n")

    def test_tooLargeRefusedAfterReadingAll(self) -> None:
        reader = self.reader(maxSize=100)
        rest = reader.feed(b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\nRSET\r\n")
        self.assertEqual(rest, b"RSET\r\n")
        self.assertEqual(reader.refusal, replies.MESSAGE_TOO_BIG)
        self.assertEqual(reader.refusal.code, 552)
        self.assertEqual(reader.refusal.enhanced, "5.3.4")

    def test_lineTooLongDiscardsRestOfMessage(self) -> None:
        """The rest of the message is read and thrown away, never executed as commands."""
        reader = self.reader(maxLine=100)
        rest = reader.feed(b"a" * 99 + b"\r\n")  # 101 octets with CRLF: too long
        self.assertIsNone(rest)
        rest = reader.feed(b"RCPT TO:<x@y>\r\n.\r\n")
        self.assertEqual(rest, b"")
        self.assertEqual(reader.refusal.code, 500)
        self.assertEqual(reader.refusal.enhanced, "5.5.2")

    def test_lineAtLimitAccepted(self) -> None:
        reader = self.reader(maxLine=100)
        reader.feed(b"a" * 98 + b"\r\n.\r\n")
        self.assertIsNone(reader.refusal)

    def test_endlessLineBounded(self) -> None:
        """A line that never ends is refused without buffering it."""
        reader = self.reader(maxLine=100)
        for _ in range(100):
            self.assertIsNone(reader.feed(b"z" * 1000))
        self.assertLess(len(reader._carry), 10)
        self.assertEqual(reader.feed(b"\r\n.\r\nQUIT\r\n"), b"QUIT\r\n")
        self.assertEqual(reader.refusal.enhanced, "5.5.2")

    def test_endMarkerRightAfterEndlessLine(self) -> None:
        reader = self.reader(maxLine=100)
        reader.feed(b"z" * 500)
        self.assertEqual(reader.feed(b"\r\n.\r\n"), b"")

    def test_spoolMovesToDiskPastTheLimit(self) -> None:
        """What Spool keeps (DATA's text, BDAT's chunks) goes to an unnamed file once it
        passes SPOOL_IN_MEMORY, and reads back whole."""
        spoolDir = Path(self.mktemp())
        spoolDir.mkdir()
        spool = Spool(str(spoolDir))
        self.addCleanup(spool.close)
        chunk = b"y" * 65536
        written = b""
        while not spool.onDisk:
            spool.write(chunk)
            written += chunk
        self.assertGreater(len(written), SPOOL_IN_MEMORY)
        self.assertEqual(_openFileSizesUnder(spoolDir), [len(written)])
        spool.write(memoryview(b"tail"))
        self.assertEqual(spool.read(), written + b"tail")
        spool.close()
        self.assertEqual(_openFileSizesUnder(spoolDir), [])

    def test_largeMessageSpooled(self) -> None:
        """Past SPOOL_IN_MEMORY the message waits in a file of the spool directory (unnamed:
        it is seen among the process's open files), not in memory."""
        spoolDir = Path(self.mktemp())
        spoolDir.mkdir()
        reader = DataReader(10 * SPOOL_IN_MEMORY, 1000, str(spoolDir))
        self.addCleanup(reader.close)
        line = b"x" * 78 + b"\r\n"
        body = line * (2 * SPOOL_IN_MEMORY // len(line))
        for i in range(0, len(body), 65536):
            self.assertIsNone(reader.feed(body[i : i + 65536]))
        self.assertEqual(_openFileSizesUnder(spoolDir), [len(body)])
        self.assertEqual(reader.feed(b".\r\n"), b"")
        self.assertEqual(reader.message(), body)

    @settings(max_examples=300, deadline=None)
    @given(lines=st.lists(_dotted, max_size=30), cuts=st.lists(st.integers(0, 2000), max_size=8))
    def test_anyChunkingGivesTheMessageBack(self, lines: list[bytes], cuts: list[int]) -> None:
        message = b"".join(line + b"\r\n" for line in lines)
        wire = stuff(message) + b"NEXT\r\n"
        reader = DataReader(1_000_000, 1000)
        rest = feedAll(reader, split(wire, cuts))
        self.assertEqual(rest, b"NEXT\r\n")
        self.assertIsNone(reader.refusal)
        self.assertEqual(reader.message(), message)

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=6))
    def test_arbitraryBytesNeverEndEarly(self, data: bytes, cuts: list[int]) -> None:
        """Whatever the bytes, the message ends at the first CRLF . CRLF and nowhere else."""
        wire = b"\r\n" + data
        end = wire.find(b"\r\n.\r\n")
        reader = DataReader(1_000_000, 1000)
        rest = feedAll(reader, split(data, cuts))
        if end < 0:
            self.assertIsNone(rest)
        else:
            self.assertEqual(rest, wire[end + 5 :])

    @settings(max_examples=3000, deadline=None)
    @given(
        data=st.lists(
            st.sampled_from([b"a", b"bcd", b"\r", b"\n", b"\r\n", b".", b"\r\n.", b".\r\n"]),
            max_size=40,
        ).map(b"".join),
        cuts=st.lists(st.integers(0, 200), max_size=6),
    )
    def test_agreesWithTheReference(self, data: bytes, cuts: list[int]) -> None:
        """However the input is cut into chunks: the same end, refusal and message as
        :func:`referenceOutcome` (short lines, so that the over-long line path comes up)."""
        reader = DataReader(1_000_000, 6)  # lines of 4 octets and their CRLF
        rest = feedAll(reader, split(data, cuts))
        expected = referenceOutcome(data, 4)
        if expected is None:
            self.assertIsNone(rest)
            return
        message, refused, after = expected
        self.assertEqual((rest, reader.refusal is not None), (after, refused))
        if not refused:
            self.assertEqual(reader.message(), message)


# Text made mostly of what the scans look for, so that every arrangement of CR, LF and dots
# (bare, paired, at either end, next to each other) comes up.
_scanText = st.lists(
    st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b".", b"\r\n."]), max_size=60
).map(b"".join)


class LineProblemTests(SynchronousTestCase):
    """The pure-Python scans, on the cases that decide them (the native ones must agree: see
    NativeScanTests)."""

    def test_fine(self) -> None:
        self.assertEqual(pyLineProblem(b"", 5), 0)
        self.assertEqual(pyLineProblem(b"abc\r\n\r\nde\r\n", 5), 0)
        self.assertEqual(pyLineProblem(b"abcde\r\n", 5), 0)

    def test_bare(self) -> None:
        for text in (b"\n", b"\r", b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"a\r\n\n", b"a\r\n\r"):
            self.assertEqual(pyLineProblem(text, 5), 1, text)

    def test_tooLong(self) -> None:
        self.assertEqual(pyLineProblem(b"abcdef\r\n", 5), 2)
        self.assertEqual(pyLineProblem(b"ab\r\nabcdef", 5), 2)  # the text after the last CRLF

    def test_bareWinsOverTooLong(self) -> None:
        self.assertEqual(pyLineProblem(b"abcdef\r\nab\nc\r\n", 5), 1)

    def test_acceptsMemoryview(self) -> None:
        """The reader hands views of its buffer, also to the pure-Python fallback."""
        self.assertEqual(pyLineProblem(memoryview(b"xxabcdef\r\n")[2:], 5), 2)
        self.assertEqual(pyLineProblem(memoryview(b"ab\r\nc\n")[:4], 5), 0)

    def test_findDotLine(self) -> None:
        self.assertEqual(pyFindDotLine(b"ab\r\n.c", 0), 2)
        self.assertEqual(pyFindDotLine(b"ab\r\n.c", 3), -1)
        self.assertEqual(pyFindDotLine(b"ab\n.\r\n", 0), -1)
        self.assertEqual(pyFindDotLine(b"ab\r\n", 0), -1)


class NativeScanTests(SynchronousTestCase):
    """The C extension gives the pure-Python answers."""

    def setUp(self) -> None:
        if not NATIVE_SCAN:
            raise SkipTest("the _mailrelay_scan extension is not built here")
        import _mailrelay_scan

        self.native = _mailrelay_scan

    @given(_scanText, st.integers(min_value=0, max_value=8))
    @settings(max_examples=3000, deadline=None)
    def test_lineProblemAgrees(self, text: bytes, maxLine: int) -> None:
        self.assertEqual(self.native.line_problem(text, maxLine), pyLineProblem(text, maxLine))

    @given(_scanText, st.integers(min_value=0, max_value=70))
    @settings(max_examples=3000, deadline=None)
    def test_findDotLineAgrees(self, text: bytes, start: int) -> None:
        self.assertEqual(self.native.find_dot_line(text, start), pyFindDotLine(text, start))

    def test_largeMessage(self) -> None:
        line = b"The quick brown fox jumps over the lazy dog.\r\n"
        text = line * 3000
        for each in (text, text + b"x" * 999, text[:-1] + b"\r" + line, b"\n" + text):
            self.assertEqual(self.native.line_problem(each, 998), pyLineProblem(each, 998))
        stuffed = text + b"..dot\r\n" + text
        self.assertEqual(self.native.find_dot_line(stuffed, 0), len(text) - 2)
        self.assertEqual(self.native.find_dot_line(stuffed, len(text)), -1)

    def test_acceptsMemoryview(self) -> None:
        self.assertEqual(self.native.line_problem(memoryview(b"a\r\nb\n"), 5), 1)
        self.assertEqual(self.native.find_dot_line(memoryview(b"a\r\n.."), 0), 1)

    def test_usedByTheReader(self) -> None:
        self.assertIs(findDotLine, self.native.find_dot_line)
