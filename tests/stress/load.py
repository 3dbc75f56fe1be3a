"""
Blocking load for the stress tests: clients in threads that submit messages over STARTTLS on
one connection each, reconnecting after failures, and record what the relay acknowledged;
and what the memory tests measure with: the relay's RSS (:func:`rssKiB`, :class:`PeakRSS`)
and idle connections from several loopback addresses (:func:`openIdle`).
"""

from __future__ import annotations

import collections
import re
import socket
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
            if _logIn(client, self.context) != 235:
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


def _logIn(client: WireClient, context: ssl.SSLContext) -> int:
    """Greeting, EHLO, STARTTLS, EHLO, AUTH: the AUTH reply's code."""
    client.sock.settimeout(20)
    client.reply()
    client.command("EHLO load.test")
    client.command("STARTTLS")
    client.startTLS(context)
    client.command("EHLO load.test")
    return client.login(ACCOUNT, PASSWORD).code


def submitOnce(port: int, context: ssl.SSLContext) -> int:
    """One message in a session of its own, as the load's clients send it: the code of the
    first reply that refuses (AUTH, MAIL, RCPT, DATA), or of the reply to the message."""
    with WireClient(port) as client:
        code = _logIn(client, context)
        if code != 235:
            return code
        for command in (f"MAIL FROM:<{SENDER}>", "RCPT TO:<a@example.org>"):
            code = client.command(command).code
            if code >= 400:
                return code
        code = client.command("DATA").code
        if code != 354:
            return code
        client.send(BODY)
        return client.reply().code


# -- memory under floods -------------------------------------------------------------------


def rssKiB(pid: int) -> int:
    """The resident set size of process ``pid`` now (VmRSS of /proc/PID/status), in KiB."""
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")


class PeakRSS:
    """Samples the RSS of ``pid`` every ``interval`` seconds in a thread, keeping the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = rssKiB(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, rssKiB(self.pid))
        except (OSError, ValueError):
            pass  # the process is gone

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()


def loopbackAddresses(count: int, perAddress: int = 900) -> list[str]:
    """Client addresses for ``count`` connections, at most ``perAddress`` from each (under the
    relay's default of 1,000 per client): 127.0.0.2, 127.0.0.3, ... (all loopback on Linux)."""
    return [f"127.0.0.{2 + i // perAddress}" for i in range(count)]


def openIdle(port: int, count: int, perAddress: int = 900) -> list[socket.socket]:
    """Blocking: ``count`` connections to ``port`` that read the 220 greeting and then stay,
    sending nothing."""
    sockets: list[socket.socket] = []
    try:
        for source in loopbackAddresses(count, perAddress):
            s = socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=(source, 0)
            )
            sockets.append(s)
            greeting = s.recv(512)
            if not greeting.startswith(b"220 "):
                raise ConnectionError(f"no greeting from {source}: {greeting!r}")
    except BaseException:
        closeAll(sockets)
        raise
    return sockets


def closeAll(sockets: list[socket.socket]) -> None:
    for s in sockets:
        s.close()
