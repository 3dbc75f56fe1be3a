"""Tests for mailrelay.headerblock: a header block split into its fields."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailrelay import headerblock
from mailrelay.headerblock import HeaderField, fieldValue, headerFields, pyHeaderFields

_headerText = st.lists(
    st.sampled_from(
        [b"From", b"x-Ib-A", b"a", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"\x80"]
    ),
    max_size=40,
).map(b"".join)


class HeaderFieldsTests(SynchronousTestCase):
    """The pure-Python reference, on the cases that decide it (the native split must agree:
    see NativeHeaderFieldsTests)."""

    def test_empty(self) -> None:
        self.assertEqual(pyHeaderFields(b""), [])

    def test_fieldsAndContinuations(self) -> None:
        block = b"From: a@example.com\r\nSubject: one\r\n\ttwo\r\n three\r\nTo: b\r\n"
        self.assertEqual(
            pyHeaderFields(block),
            [("from", 0, 21), ("subject", 21, 49), ("to", 49, 56)],
        )
        self.assertEqual(fieldValue(block, pyHeaderFields(block)[1]), b"one\ttwo three")

    def test_namesLowerCasedBlanksBeforeTheColon(self) -> None:
        self.assertEqual(pyHeaderFields(b"X-IB-Bulk-Id \t: 7\r\n"), [("x-ib-bulk-id", 0, 19)])

    def test_lastLineWithoutItsCRLF(self) -> None:
        self.assertEqual(pyHeaderFields(b"A: 1\r\nB: 2"), [("a", 0, 6), ("b", 6, 10)])

    def test_linesThatAreNotFields(self) -> None:
        """A line without a name and colon, a continuation first of all and an empty line are
        each a field of no name."""
        self.assertEqual(
            pyHeaderFields(b" lead\r\nA: 1\r\nno colon\r\n\r\n: none\r\n"),
            [("", 0, 7), ("a", 7, 13), ("", 13, 23), ("", 23, 25), ("", 25, 33)],
        )

    def test_onlyCRLFEndsALine(self) -> None:
        """A bare CR or LF is part of its line (the content rules refuse such a header)."""
        self.assertEqual(pyHeaderFields(b"A: 1\nB: 2\r\r\nC: 3\r\n"), [("a", 0, 12), ("c", 12, 18)])

    def test_fieldsAreHeaderFields(self) -> None:
        (field,) = pyHeaderFields(b"To: x\r\n")
        self.assertIsInstance(field, HeaderField)
        self.assertEqual((field.name, field.start, field.end), ("to", 0, 7))


class NativeHeaderFieldsTests(SynchronousTestCase):
    """The C extension's split gives the pure-Python answers."""

    def setUp(self) -> None:
        try:
            from _mailrelay_scan import header_fields
        except ImportError:
            raise SkipTest("the _mailrelay_scan extension is not built here") from None
        self.native = header_fields

    @given(_headerText)
    @settings(max_examples=3000, deadline=None)
    def test_agrees(self, block: bytes) -> None:
        native = self.native(block, HeaderField)
        self.assertEqual(native, pyHeaderFields(block))
        self.assertEqual({type(field) for field in native}, {HeaderField} if native else set())

    def test_aLargeHeader(self) -> None:
        block = b"".join(b"Received: from host%d\r\n\tby relay\r\n" % i for i in range(3000))
        self.assertEqual(self.native(block, HeaderField), pyHeaderFields(block))

    def test_acceptsMemoryview(self) -> None:
        self.assertEqual(self.native(memoryview(b"xxA: 1\r\n")[2:], HeaderField), [("a", 0, 6)])

    def test_fieldTypeMustBeATuple(self) -> None:
        self.assertRaises(TypeError, self.native, b"A: 1\r\n", dict)

    def test_usedByTheReaders(self) -> None:
        self.assertIsNot(headerblock.headerFields, pyHeaderFields)
        self.assertEqual(headerFields(b"A: 1\r\n"), [("a", 0, 6)])
