"""
A whole mailrelay for integration tests: real sockets on 127.0.0.1, real TLS, the real SQLite
store in the test's temp directory.

- :class:`RelayFiles` writes what a relay needs into a directory: a trustme CA with a server
  certificate for ``relay.test`` / 127.0.0.1, and a TOML config naming it.
- :class:`RunningRelay` runs the relay in the test process through ``mailrelay.tap`` (exactly the
  service tree ``twistd mailrelay`` runs) with one account that has a password, an API key and a
  sender domain. ``await startRelay(testCase)`` starts one and stops it in the test's cleanup.
- :class:`RelayProcess` runs ``twistd -n mailrelay`` as a child process (for crash tests).
- :class:`WireClient` is a small blocking SMTP client speaking raw lines, for what smtplib hides
  (pipelining, STARTTLS injection). Run it -- and every other blocking client -- through
  ``twisted.internet.threads.deferToThread`` so the reactor keeps serving the relay.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trustme
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from mailrelay.auth.secrets import hashPassword, newApiKey
from mailrelay.config import loadConfig
from mailrelay.core import StoreService
from mailrelay.interfaces import IStore, StoreError
from mailrelay.model import API_KEY_USER, Account, Sender
from mailrelay.smtp.listener import SubmissionFactory
from mailrelay.smtp.replies import Reply
from mailrelay.store import makeStore
from mailrelay.tap import Options, makeService

REPO_ROOT = Path(__file__).resolve().parent.parent

HOSTNAME = "relay.test"
ACCOUNT = "acme"
PASSWORD = "correct horse battery staple"
SENDER_DOMAIN = "acme.example"
SENDER = f"app@{SENDER_DOMAIN}"
CLIENT_TIMEOUT = 10.0
"""Seconds any blocking client in these tests waits for the relay before giving up."""

ANY_LOCAL_PORT = "tcp:0:interface=127.0.0.1"


@dataclass(frozen=True)
class Listener:
    """One ``[[listeners]]`` entry; ``name`` is how tests find its port."""

    name: str
    security: str
    auth: str = "required"
    endpoint: str = ANY_LOCAL_PORT


DEFAULT_LISTENERS = (
    Listener("starttls", "starttls"),
    Listener("tls", "tls"),
    Listener("plain", "none"),
    Listener("network", "none", auth="network"),
)


@functools.cache
def passwordHash() -> str:
    """The Argon2 hash of :data:`PASSWORD`, computed once per test run (Argon2 is slow)."""
    return hashPassword(PASSWORD)


_PORTS_BELOW = 32768
"""Where Linux's ephemeral range (``net.ipv4.ip_local_port_range``) starts: ports below it
are never handed to an outgoing connection."""


def freePort() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for child processes only). Picked
    below the ephemeral range: a port the kernel chose (``bind(0)``) may be taken again by
    any outgoing connection -- the relay's own delivery client, a Redis client -- before the
    child process binds it."""
    for _ in range(100):
        port = random.randrange(20000, _PORTS_BELOW)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def startRedisServer(
    testCase: TestCase, port: int | None = None, *options: str
) -> tuple[subprocess.Popen[bytes], int]:
    """A private ``redis-server`` on 127.0.0.1 (``port``, or a free one) keeping nothing on
    disk unless ``options`` say otherwise, killed at the test's cleanup; once it accepts
    connections. Skips the test where redis-server is not installed."""
    if shutil.which("redis-server") is None:
        raise SkipTest("redis-server is not installed")
    port = freePort() if port is None else port
    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", *options],
        stdout=subprocess.DEVNULL,
    )
    testCase.addCleanup(server.wait)
    testCase.addCleanup(server.kill)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            time.sleep(0.02)
    testCase.fail("redis-server did not start")


def _toml(value: str) -> str:
    # A JSON string is a valid TOML basic string.
    return json.dumps(value)


class RelayFiles:
    """The CA, the server certificate and the config file of one relay, under ``directory``."""

    def __init__(
        self,
        directory: Path,
        listeners: Sequence[Listener] = DEFAULT_LISTENERS,
        extra: str = "",
        webEndpoint: str = ANY_LOCAL_PORT,
        workers: int | str = 1,
    ) -> None:
        self.directory = directory = directory.resolve()
        self.listeners = tuple(listeners)
        self.webEndpoint = webEndpoint
        # One process unless a test asks for more ("auto", the default of a user's file, runs
        # one per core): most tests read or count what one process did.
        self.workers = workers
        directory.mkdir(parents=True, exist_ok=True)
        self.dataDir = directory / "data"
        ca = trustme.CA()
        serverCert = ca.issue_cert(HOSTNAME, "127.0.0.1")
        self.caPath = directory / "ca.pem"
        self.certificatePath = directory / "cert.pem"
        self.keyPath = directory / "key.pem"
        ca.cert_pem.write_to_path(str(self.caPath))
        serverCert.private_key_pem.write_to_path(str(self.keyPath))
        self.certificatePath.write_bytes(
            b"".join(pem.bytes() for pem in serverCert.cert_chain_pems)
        )
        self.configPath = directory / "mailrelay.toml"
        self.configPath.write_text(self.configText(extra))

    def configText(self, extra: str = "") -> str:
        """The TOML config: these files, these listeners, and ``extra`` TOML appended."""
        workers = self.workers if isinstance(self.workers, int) else _toml(self.workers)
        lines = [
            f"hostname = {_toml(HOSTNAME)}",
            f"data_dir = {_toml(str(self.dataDir))}",
            f"workers = {workers}",
            "",
            "[tls]",
            f"certificate = {_toml(str(self.certificatePath))}",
            f"key = {_toml(str(self.keyPath))}",
            "",
            "[web]",
            f"endpoint = {_toml(self.webEndpoint)}",
        ]
        for listener in self.listeners:
            lines += [
                "",
                "[[listeners]]",
                f"endpoint = {_toml(listener.endpoint)}",
                f"security = {_toml(listener.security)}",
                f"auth = {_toml(listener.auth)}",
            ]
        return "\n".join(lines) + "\n" + extra

    def clientContext(self) -> ssl.SSLContext:
        """A client TLS context that verifies the relay's certificate against the test CA."""
        return ssl.create_default_context(cafile=str(self.caPath))

    def makeStore(self) -> IStore:
        """The relay's store (not yet opened), for use while no relay runs in this process."""
        return makeStore(loadConfig(str(self.configPath)), globalReactor)


@dataclass(frozen=True)
class Credentials:
    """The test account and the secrets it logs in with."""

    account: Account
    password: str
    apiKey: str


async def addAccount(store: IStore) -> Credentials:
    """Create :data:`ACCOUNT` with :data:`PASSWORD`, one API key and :data:`SENDER_DOMAIN`."""
    account = await store.addAccount(ACCOUNT, passwordHash())
    await store.addSender(Sender(ACCOUNT, SENDER_DOMAIN, "domain"))
    keyId, key, keyHash = newApiKey()
    await store.addApiKey(ACCOUNT, keyId, keyHash)
    return Credentials(account, PASSWORD, key)


async def addAccountByIP(files: RelayFiles) -> Credentials:
    """:func:`addAccount` in the store of ``files`` (opened and closed again), with the
    networks 127.0.0.0/8: the test account submits from loopback without AUTH (relay by IP)."""
    store = files.makeStore()
    await store.open()
    try:
        credentials = await addAccount(store)
        account = replace(credentials.account, networks=("127.0.0.0/8",))
        await store.updateAccount(account)
    finally:
        await store.close()
    return replace(credentials, account=account)


class RunningRelay:
    """
    The relay's whole service tree running in this process, as ``twistd mailrelay`` builds it.

    After :meth:`start`: ``ports`` maps each listener's name to its port (and ``"web"`` to the
    status API's), ``store`` is the relay's own (open) store, and ``account`` / ``password`` /
    ``apiKey`` log in.
    """

    def __init__(self, files: RelayFiles, reactor: Any = globalReactor) -> None:
        self.files = files
        self.caPath = files.caPath
        self._reactor = reactor
        self.ports: dict[str, int] = {}
        self.store: Any = None
        self.account: Account | None = None
        self.password = PASSWORD
        self.apiKey = ""
        self._service: MultiService | None = None
        self._listeningPorts: list[Any] = []

    def start(self) -> Deferred[None]:
        """Build and start the services, wait for the store, add the account."""
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        options = Options()
        options.parseOptions(["--config", str(self.files.configPath)])
        service = makeService(options, self._reactor)
        self._service = service
        service.privilegedStartService()
        service.startService()
        smtpListeners = [s for s in service if _isSMTPListener(s)]
        (webListener,) = [s for s in service if _isWebListener(s)]
        names = [listener.name for listener in self.files.listeners]
        for name, listening in [*zip(names, smtpListeners, strict=True), ("web", webListener)]:
            # The endpoint service keeps the Deferred of its listening port; with tcp:0 that is
            # the only place the chosen port number can be read from.
            port = await listening._waitingForPort
            self._listeningPorts.append(port)
            self.ports[name] = port.getHost().port
        (storeService,) = [s for s in service if isinstance(s, StoreService)]
        self.store = storeService.store
        await self._storeOpen()
        credentials = await addAccount(self.store)
        self.account = credentials.account
        self.apiKey = credentials.apiKey

    async def _storeOpen(self, timeout: float = 10.0) -> None:
        # StoreService opens the store without telling anyone when it is done: ask until it
        # answers.
        deadline = self._reactor.seconds() + timeout
        while True:
            try:
                await self.store.ping()
                return
            except StoreError:
                if self._reactor.seconds() > deadline:
                    raise
                await deferLater(self._reactor, 0.01)

    def updateAccount(self, **changes: Any) -> Deferred[None]:
        """Change the test account's settings in the store (``networks=(...)``, ...)."""
        assert self.account is not None
        self.account = dataclasses.replace(self.account, **changes)
        return self.store.updateAccount(self.account)

    def stop(self) -> Deferred[None]:
        """Close the relay's connections (aborting any a client left open), stop the services."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self, grace: float = 2.0) -> None:
        if self._service is None:
            return
        deadline = self._reactor.seconds() + grace
        while connections := self._serverConnections():
            if self._reactor.seconds() > deadline:
                for connection in connections:
                    connection.abortConnection()
            await deferLater(self._reactor, 0.01)
        service, self._service = self._service, None
        await service.stopService()

    def _serverConnections(self) -> list[Any]:
        selectables = set(self._reactor.getReaders()) | set(self._reactor.getWriters())
        return [s for s in selectables if getattr(s, "server", None) in self._listeningPorts]


def _isSMTPListener(service: object) -> bool:
    if not isinstance(service, StreamServerEndpointService):
        return False
    factory = getattr(service.factory, "wrappedFactory", service.factory)  # implicit TLS
    return isinstance(factory, SubmissionFactory)


def _isWebListener(service: object) -> bool:
    return (
        isinstance(service, StreamServerEndpointService)
        and isinstance(service.factory, Site)
        and not getattr(service.factory, "tracking", False)  # the public tracking listener
    )


async def startRelay(
    testCase: TestCase, listeners: Sequence[Listener] = DEFAULT_LISTENERS, extra: str = ""
) -> RunningRelay:
    """A started :class:`RunningRelay` in the test's temp directory, stopped at cleanup."""
    relay = RunningRelay(RelayFiles(Path(testCase.mktemp()), listeners, extra))
    testCase.addCleanup(relay.stop)
    await relay.start()
    return relay


class RelayProcess:
    """
    ``twistd -n mailrelay --config FILE`` as a child process, run from this source tree.

    Its output goes to ``logPath`` (read it with :meth:`log` when something goes wrong).
    The blocking methods are meant for ``deferToThread``.
    """

    def __init__(self, files: RelayFiles, name: str = "relay") -> None:
        self.files = files
        self.logPath = files.directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def command(configPath: Path) -> list[str]:
        """The twistd command line for ``configPath`` (twistd's module has no ``__main__``)."""
        return [
            sys.executable,
            "-c",
            "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "mailrelay",
            "--config",
            str(configPath),
        ]

    @staticmethod
    def environment() -> dict[str, str]:
        """The environment that finds this tree's package and twistd plugin first."""
        path = os.environ.get("PYTHONPATH")
        pythonPath = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
        return {**os.environ, "PYTHONPATH": pythonPath}

    def start(self) -> None:
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                self.command(self.files.configPath),
                cwd=REPO_ROOT,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def waitUntilServing(self, port: int, timeout: float = 15.0) -> None:
        """
        Block until the relay greets on ``port`` (so its reactor runs and has installed its
        signal handlers); raise if the process exits first.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"relay exited with {self.process.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    if s.recv(512).startswith(b"220 "):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay not serving on {port}:\n{self.log()}")
            time.sleep(0.05)

    def signal(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send ``signum`` and wait for the process to end. Returns its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    def waitForLog(self, text: str, count: int = 1, timeout: float = 30) -> None:
        """Blocking: until ``text`` is in the log ``count`` times (AssertionError after
        ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log {count} times:\n{self.log()}")
            time.sleep(0.05)


def runCommand(
    command: Sequence[str], input: str | None = None, timeout: float = 20.0
) -> Deferred[subprocess.CompletedProcess[str]]:
    """
    Run ``command`` to its end in a thread, from the source tree with its package first on the
    path; its output as text. Raises subprocess.TimeoutExpired after ``timeout`` seconds.
    """

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(command),
            input=input,
            cwd=REPO_ROOT,
            env=RelayProcess.environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return deferToThread(run)


_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class WireReply:
    """An SMTP reply as read off the wire: the code and each line's text."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code (``5.7.0``) of the last line, if it has one."""
        first = self.lines[-1].split(" ", 1)[0] if self.lines else ""
        return first if _ENHANCED.match(first) else None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def matches(self, reply: Reply) -> bool:
        """Whether this is ``reply`` (one of mailrelay.smtp.replies): same codes, any text."""
        return (self.code, self.enhanced) == (reply.code, reply.enhanced)


class WireClient:
    """
    A blocking SMTP client that sends exactly the bytes it is given and reads replies one by one.
    Every socket operation times out after :data:`CLIENT_TIMEOUT` seconds.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=CLIENT_TIMEOUT)
        self._buffer = b""

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def startTLS(self, context: ssl.SSLContext, serverName: str = HOSTNAME) -> None:
        """Handshake on the connection as it is now (after a 220 to STARTTLS, or at once)."""
        if self._buffer:
            raise AssertionError(f"cleartext received before the TLS handshake: {self._buffer!r}")
        self.sock = context.wrap_socket(self.sock, server_hostname=serverName)

    def send(self, data: bytes) -> None:
        """Write ``data`` in one write."""
        self.sock.sendall(data)

    def readLine(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unfinished input {self._buffer!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> WireReply:
        """The next (possibly multi-line) reply."""
        code, lines = None, []
        while True:
            line = self.readLine().decode("utf-8")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (" ", "-", ""):
                raise AssertionError(f"not an SMTP reply line: {line!r}")
            if code is not None and int(line[:3]) != code:
                raise AssertionError(f"reply code changed inside a multi-line reply: {line!r}")
            code = int(line[:3])
            lines.append(line[4:])
            if line[3:4] != "-":
                return WireReply(code, tuple(lines))

    def replies(self, count: int) -> list[WireReply]:
        return [self.reply() for _ in range(count)]

    def command(self, line: str) -> WireReply:
        """Send one command line and read its reply."""
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def login(self, user: str, password: str) -> WireReply:
        """AUTH PLAIN with an initial response."""
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        return self.command(f"AUTH PLAIN {token}")

    def loginWithApiKey(self, apiKey: str) -> WireReply:
        return self.login(API_KEY_USER, apiKey)

    def readUntilClosed(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        received = self._buffer
        self._buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk
