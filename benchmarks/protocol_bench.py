"""
SMTP protocol benchmark: CPU time per message of :class:`SubmissionProtocol` alone.

The protocol runs on a ``StringTransport`` (no sockets, no reactor turns), fed one pipelined
``MAIL``/``RCPT``/``DATA`` and then the message and its end marker, over and over, on one
relay-by-IP session whose avatar answers every check at once and "stores" with a Deferred
that has already fired (as the relay's no-store column). What is left is the protocol's own
work per message -- reading commands, the DATA reader, replies, timers -- without the
variance of the network and the other core, so an A/B of two trees shows changes of 1 %::

    python -m benchmarks.protocol_bench                 # this tree
    PYTHONPATH=/tmp/other-tree python -m benchmarks.protocol_bench

Reports the best of ``--repeat`` rounds of ``--messages`` messages.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailrelay.config import parseConfig
from mailrelay.model import Recipient
from mailrelay.smtp.protocol import SubmissionProtocol
from mailrelay.smtp.settings import ListenerSettings

NOTIFICATION_ID = "915151594364862464"


class InstantAvatar:
    """Accepts every sender and recipient at once; a message is "stored" at once."""

    class account:  # noqa: N801 -- read as ``avatar.account.name``, as a real avatar's
        name = "bench"

    def validateFrom(self, session: Any, sender: str, smtputf8: bool, size: int | None) -> str:
        return sender

    def validateTo(
        self, session: Any, sender: str, recipient: str, accepted: Any, smtputf8: bool
    ) -> Recipient:
        return Recipient(recipient, "email")

    def acceptMessage(
        self, session: Any, sender: str, recipients: Any, message: bytes
    ) -> Deferred[str]:
        return succeed(NOTIFICATION_ID)


def session() -> tuple[SubmissionProtocol, StringTransport]:
    """A relay-by-IP session after EHLO."""
    limits = parseConfig({}).limits
    settings = ListenerSettings(
        name="bench",
        hostname="relay.test",
        security="none",
        authMode="network",
        allowPlaintextAuth=False,
        limits=limits,
        portal=None,  # type: ignore[arg-type]  # no AUTH on this session
        clock=Clock(),
        throttle=None,  # type: ignore[arg-type]
        networkLogin=lambda session: (InstantAvatar(), lambda: None),
    )
    protocol = SubmissionProtocol(settings)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(b"EHLO client.test\r\n")
    return protocol, transport


def microsecondsPerMessage(size: int, messages: int, repeat: int) -> float:
    protocol, transport = session()
    commands = b"MAIL FROM:<app@bench.example>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n"
    header = b"From: app@bench.example\r\nSubject: protocol benchmark\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    message = header + line * max(1, (size - len(header)) // len(line)) + b".\r\n"
    best = float("inf")
    for _ in range(repeat):
        transport.clear()
        started = time.process_time()
        for _ in range(messages):
            protocol.dataReceived(commands)
            protocol.dataReceived(message)
        best = min(best, (time.process_time() - started) / messages * 1e6)
        accepted = transport.value().count(b"250 2.0.0 OK id=")
        if accepted != messages:
            tail = transport.value()[-300:]
            raise SystemExit(f"only {accepted} of {messages} accepted: {tail!r}")
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--size", type=int, default=2048, help="message size in octets")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    cost = microsecondsPerMessage(args.size, args.messages, args.repeat)
    print(f"{cost:.2f} us of CPU per {args.size}-octet message (best of {args.repeat})")


if __name__ == "__main__":
    main()
