"""Tests for mailrelay.smtp.data: the bulk DATA reader."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.smtp import replies
from mailrelay.smtp.data import SPOOL_IN_MEMORY, DataReader


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

    def test_largeMessageSpooled(self) -> None:
        reader = self.reader(maxSize=10 * SPOOL_IN_MEMORY)
        line = b"x" * 78 + b"\r\n"
        body = line * (2 * SPOOL_IN_MEMORY // len(line))
        for i in range(0, len(body), 65536):
            self.assertIsNone(reader.feed(body[i : i + 65536]))
        self.assertIsNotNone(reader._spool)
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
