"""Pre-built SMTP byte blobs: built once per run so the load loop only writes bytes."""

from __future__ import annotations

import base64
from dataclasses import dataclass

SENDER = "load@bench.example"


def message_body(size: int) -> bytes:
    """A plain-text message of about ``size`` bytes, CRLF lines, ending with CRLF.CRLF."""
    header = (
        f"From: <{SENDER}>\r\n"
        "To: <user0@example.com>\r\n"
        "Subject: mailrelay benchmark\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "Message-ID: <bench@bench.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen.\r\n"
    count = max(1, (size - len(header)) // len(line))
    return header + line * count + b".\r\n"


@dataclass(frozen=True)
class Blobs:
    """Everything the client writes during a transaction, ready to send."""

    rcpts: int
    envelope: bytes  # MAIL + every RCPT + DATA, for one pipelined write
    commands: tuple[bytes, ...]  # the same commands one by one, for servers without PIPELINING
    body: bytes

    @classmethod
    def build(cls, size: int, rcpts: int) -> Blobs:
        commands = (
            f"MAIL FROM:<{SENDER}>\r\n".encode(),
            *(f"RCPT TO:<user{i}@example.com>\r\n".encode() for i in range(rcpts)),
            b"DATA\r\n",
        )
        return cls(rcpts, b"".join(commands), commands, message_body(size))


def auth_plain(user: str, password: str) -> bytes:
    """The AUTH PLAIN command line with the initial response."""
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return f"AUTH PLAIN {token}\r\n".encode()
