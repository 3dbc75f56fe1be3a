"""The MAIL FROM / RCPT TO argument parser."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.smtp.arguments import MailOptions, mailOptions, parsePathArgument
from mailrelay.smtp.replies import SYNTAX_ERROR, UNKNOWN_PARAMETER, Refused
from tests.test_policy_support import RefusalMixin


class PathTests(RefusalMixin, SynchronousTestCase):
    def test_plain(self) -> None:
        self.assertEqual(parsePathArgument("<a@example.com>"), ("a@example.com", {}))

    def test_spaceAfterColon(self) -> None:
        self.assertEqual(parsePathArgument(" <a@example.com>"), ("a@example.com", {}))

    def test_parameters(self) -> None:
        self.assertEqual(
            parsePathArgument("<a@example.com> size=1000 BODY=8BITMIME SMTPUTF8"),
            ("a@example.com", {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None}),
        )

    def test_nullPathOnlyForMail(self) -> None:
        self.assertEqual(parsePathArgument("<>", allowNull=True), ("", {}))
        self.assertRefused(SYNTAX_ERROR, parsePathArgument, "<>")

    def test_bareAddressLikeSmsGateways(self) -> None:
        self.assertEqual(parsePathArgument(" +393331234567"), ("+393331234567", {}))
        self.assertEqual(
            parsePathArgument("a@example.com SIZE=5"), ("a@example.com", {"SIZE": "5"})
        )

    def test_quotedLocalPartWithBracket(self) -> None:
        self.assertEqual(parsePathArgument('<"a> b"@example.com>'), ('"a> b"@example.com', {}))

    def test_sourceRouteDropped(self) -> None:
        self.assertEqual(
            parsePathArgument("<@relay.example,@b.example:a@example.com>"), ("a@example.com", {})
        )

    def test_malformed(self) -> None:
        for argument in (
            "<a@example.com",
            "<a@example.com>SIZE=1",
            "<a@example.com> SIZE=",
            "<a@example.com> =1",
            "<a@example.com> SIZE=1 size=2",
            "<a@example.com> -X",
            "",
            "a@example.com>",
            "<@relay.example>",
            "<a b@example.com>",
        ):
            self.assertRefused(SYNTAX_ERROR, parsePathArgument, argument)


class MailOptionsTests(RefusalMixin, SynchronousTestCase):
    def test_known(self) -> None:
        self.assertEqual(
            mailOptions({"SIZE": "1000", "BODY": "8bitmime", "SMTPUTF8": None}),
            MailOptions(1000, "8BITMIME", True),
        )

    def test_badValues(self) -> None:
        for parameters in (
            {"SIZE": "x"},
            {"SIZE": None},
            {"BODY": "BINARYMIME"},
            {"SMTPUTF8": "1"},
        ):
            self.assertRefused(SYNTAX_ERROR, mailOptions, parameters)

    def test_unknown(self) -> None:
        self.assertRefused(UNKNOWN_PARAMETER, mailOptions, {"RET": "FULL"})


_ARGUMENT_ALPHABET = st.sampled_from([*'<>@"\\ :=,.+-aZ09\t\x00é', "SIZE", "BODY"])


class FuzzTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        st.text(max_size=60) | st.lists(_ARGUMENT_ALPHABET, max_size=30).map("".join), st.booleans()
    )
    def test_onlyRefused(self, argument: str, allowNull: bool) -> None:
        try:
            address, parameters = parsePathArgument(argument, allowNull=allowNull)
        except Refused as e:
            self.assertEqual(e.reply.code, SYNTAX_ERROR.code)
            return
        self.assertIsInstance(address, str)
        try:
            mailOptions(parameters)
        except Refused:
            pass
