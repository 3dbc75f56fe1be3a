"""isDecimal: the one check before int() of a number a client wrote."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from mailrelay.numbers import isDecimal


class IsDecimalTests(TestCase):
    def test_digitsWithinTheBound(self) -> None:
        self.assertTrue(isDecimal("0", 1))
        self.assertTrue(isDecimal("1" * 20, 20))

    def test_refused(self) -> None:
        for text in ["", "1" * 21, "-1", "+1", " 1", "1.0", "١٢", "²", "1e3"]:
            with self.subTest(text=text):
                self.assertFalse(isDecimal(text, 20))
