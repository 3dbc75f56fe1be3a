"""
Blocking load for the stress tests: clients in threads that submit messages over STARTTLS on
one connection each, reconnecting after failures, and record what the relay acknowledged.
"""

from __future__ import annotations

import collections
import re
import ssl
import threading
import time

from tests.relay_fixture import ACCOUNT, PASSWORD, SENDER, WireClient

_ACCEPTED = re.compile(r"OK id=(\d+)")
BODY = (
    f"From: {SENDER}\r\nTo: a@example.org\r\nSubject: load\r\n\r\n".encode()
    + b"line of load text, long enough to be a real message body\r\n" * 40
    + b".\r\n"
)


class Submitters:
    """``count`` client threads submitting to ``port`` until :meth:`stop`."""

    def __init__(self, port: int, context: ssl.SSLContext, count: int = 4) -> None:
        self.port = port
        self.context = context
        self.acked: list[str] = []
        self.codes: collections.Counter[int] = collections.Counter()
        self.errors = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]

    def start(self) -> Submitters:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Blocking: stop the clients and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._session()
            except (OSError, ConnectionError, AssertionError, ssl.SSLError, UnicodeError):
                with self._lock:
                    self.errors += 1
                time.sleep(0.05)

    def _session(self) -> None:
        with WireClient(self.port) as client:
            client.sock.settimeout(20)
            client.reply()
            client.command("EHLO load.test")
            client.command("STARTTLS")
            client.startTLS(self.context)
            client.command("EHLO load.test")
            if client.login(ACCOUNT, PASSWORD).code != 235:
                raise ConnectionError("login refused")
            while not self._stop.is_set():
                client.command(f"MAIL FROM:<{SENDER}>")
                client.command("RCPT TO:<a@example.org>")
                if client.command("DATA").code != 354:
                    raise ConnectionError("DATA refused")
                client.send(BODY)
                reply = client.reply()
                with self._lock:
                    self.codes[reply.code] += 1
                    match = _ACCEPTED.search(reply.text)
                    if reply.code == 250 and match:
                        self.acked.append(match.group(1))
                if reply.code == 421:
                    return
