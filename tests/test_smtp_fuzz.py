"""
Fuzzing the wire: whatever bytes a client sends, the protocol answers with well-formed SMTP
replies, keeps them in order, and never raises.

The portal here has no checkers (every login fails at once, synchronously), so each example
runs to completion without a reactor; what is fuzzed is the protocol's own parsing.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.auth.throttle import LoginThrottle
from mailrelay.config import parseConfig
from mailrelay.smtp.protocol import SubmissionProtocol
from mailrelay.smtp.settings import ListenerSettings

# A reply line: code, separator, then text without control characters (UTF-8 is allowed: a
# client's non-ASCII EHLO name may be echoed).
_REPLY_LINE = re.compile(r"^[2-5]\d\d[ -][^\x00-\x1f\x7f]*$")
_VERBS = [
    b"HELO",
    b"EHLO",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"DATA",
    b"BDAT",
    b"RSET",
    b"NOOP",
    b"VRFY",
    b"HELP",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"STARTTLS",
    b"QUIT",
    b"FOO",
]
_arguments = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=30).map(lambda t: t.encode("utf-8")),  # control characters, non-ASCII
    st.sampled_from([b"<a@acme.example>", b"<>", b"client.test", b"10 LAST", b"=", b"*"]),
)
_lines = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(_VERBS), _arguments).map(lambda t: t[0] + b" " + t[1]),
        st.tuples(st.sampled_from(_VERBS), _arguments).map(lambda t: t[0] + t[1]),
        st.binary(max_size=80),
    ),
    max_size=25,
)
_endings = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


class NoRealm:
    def requestAvatar(self, *args: object) -> None:  # never reached: no checker accepts
        raise AssertionError("no login can succeed here")


class ProtocolFuzzTests(SynchronousTestCase):
    def protocol(self) -> tuple[SubmissionProtocol, StringTransport]:
        config = parseConfig({"hostname": "relay.test", "limits": {"max_message_size": 5000}})
        clock = Clock()
        settings = ListenerSettings(
            name="fuzz",
            hostname="relay.test",
            security="none",
            authMode="required",
            allowPlaintextAuth=True,
            limits=config.limits,
            portal=Portal(NoRealm(), []),  # type: ignore[arg-type]
            clock=clock,
            throttle=LoginThrottle(clock.seconds),
        )
        protocol = SubmissionProtocol(settings)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 4000))
        protocol.makeConnection(transport)
        return protocol, transport

    @settings(max_examples=500, deadline=None)
    @given(lines=_lines, ending=_endings, cuts=st.lists(st.integers(1, 50), max_size=10))
    def test_anyInputGetsWellFormedReplies(
        self, lines: list[bytes], ending: bytes, cuts: list[int]
    ) -> None:
        protocol, transport = self.protocol()
        wire = b"".join(line + ending for line in lines)
        position = 0
        for cut in [*cuts, len(wire)]:
            protocol.dataReceived(wire[position : position + cut])
            position += cut
        protocol.dataReceived(wire[position:])
        output = transport.value()
        self.assertTrue(output.endswith(b"\r\n") or output == b"", output[-80:])
        for line in output.split(b"\r\n")[:-1]:
            self.assertRegex(line.decode("utf-8"), _REPLY_LINE)
        self.assertEqual(self.flushLoggedErrors(), [])
        protocol.connectionLost()
