"""
The web endpoint in a process of its own (``[web] process``): which configurations get one,
how the pool starts it and hands the endpoint over, the forwarding of what the main process
answers, and the whole relay under twistd with the main process stopped.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessTerminated
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.resource import Resource

from mailrelay.config import ConfigError, parseConfig, webInOwnProcess, withProcessCount
from mailrelay.web.forward import MainProcessForward
from mailrelay.web.site import FORWARDED
from mailrelay.workers.balance import LoadTable
from mailrelay.workers.pool import (
    FIRST_LISTENER_FD,
    SETUP_FD,
    WebProcessSetup,
    WorkerPool,
    WorkerSetup,
)
from tests.relay_fixture import (
    ACCOUNT,
    PASSWORD,
    SENDER,
    Listener,
    RelayFiles,
    RelayProcess,
    addAccountByIP,
    freePort,
)
from tests.test_workers import ACCEPTED, _BoundPort, _ProcessClock, _running


class WebProcessConfigTests(SynchronousTestCase):
    def decided(self, table: dict[str, Any], cores: int = 2) -> bool:
        return webInOwnProcess(withProcessCount(parseConfig(table), cores))

    def test_autoWithSeveralProcesses(self) -> None:
        """``auto`` (the default) gives the endpoint a process of its own when the relay
        runs several and the endpoint's socket can be handed over."""
        self.assertEqual(parseConfig({}).web.process, "auto")
        self.assertTrue(self.decided({}))
        self.assertFalse(self.decided({}, cores=1))
        self.assertFalse(self.decided({"workers": 1}))
        haproxy = {"web": {"endpoint": "haproxy:tcp:8025:interface=127.0.0.1"}}
        self.assertTrue(self.decided(haproxy))
        for endpoint in ("unix:/run/mailrelay-web.sock", "ssl:8443:privateKey=k.pem"):
            self.assertFalse(self.decided({"web": {"endpoint": endpoint}}), endpoint)

    def test_explicit(self) -> None:
        """``separate`` even for one relay process; ``main`` even for several."""
        self.assertTrue(self.decided({"workers": 1, "web": {"process": "separate"}}))
        self.assertFalse(self.decided({"workers": 4, "web": {"process": "main"}}))

    def test_refused(self) -> None:
        """``separate`` with a socket no other process can serve, or a value not known, is
        refused at start, naming the key."""
        for web in (
            {"process": "separate", "endpoint": "unix:/run/mailrelay-web.sock"},
            {"process": "own"},
        ):
            with self.assertRaises(ConfigError) as caught:
                parseConfig({"web": web})
            self.assertIn("web.", str(caught.exception))


class _WebPort(_BoundPort):
    """A bound listening port whose reading the pool turns off and on."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def getHost(self) -> Any:
        return type("Address", (), {"port": 40123})()


class _WebListener:
    def __init__(self, description: str) -> None:
        self.description = description
        self.port = _WebPort()


class WebProcessPoolTests(SynchronousTestCase):
    """The pool's side of the web process, on a fake reactor."""

    def setUp(self) -> None:
        self.clock = _ProcessClock()
        self.loads = LoadTable.create(2)
        self.addCleanup(os.close, self.loads.fd)
        self.smtp = _WebListener("tcp:0")
        self.web = _WebListener("tcp:8025")
        self.forward = _WebListener("tcp:0:interface=127.0.0.1")
        for listener in (self.smtp, self.web, self.forward):
            self.addCleanup(listener.port.socket.close)
        self.pool = WorkerPool(
            self.clock,
            count=1,
            setup=WorkerSetup("workers = 2\n", None),
            listeners=[self.smtp],
            loads=self.loads,
            openConnections=lambda: 0,
            web=WebProcessSetup(self.web, self.forward),
        )
        self.pool.startService()

    def webProcess(self) -> Any:
        return [t.protocol for t in self.clock.spawned if t.protocol.index == 2][-1]

    def test_startedWithTheWebSocketAndTheForwardPort(self) -> None:
        worker, web = self.clock.spawned
        self.assertEqual((worker.protocol.name, web.protocol.name), ("worker 1", "web process"))
        args, childFDs = self.pool.command(2)
        self.assertEqual(args[1:4], ["-P", "-m", "mailrelay.workers.web"])
        family = int(self.web.port.socket.family)
        self.assertEqual(
            args[4:], ["--listener", f"0:{FIRST_LISTENER_FD}:{family}", "--forward", "40123"]
        )
        self.assertEqual(childFDs[FIRST_LISTENER_FD], self.web.port.fileno())
        self.assertNotIn(self.smtp.port.fileno(), childFDs.values())
        self.assertEqual(web.written, [(SETUP_FD, WorkerSetup("workers = 2\n", None).encode())])

    def test_endpointHandedOverWhileItServes(self) -> None:
        """The main process stops accepting on the web endpoint once the web process serves,
        and accepts again when it ends, until it serves again."""
        web = self.webProcess()
        self.assertTrue(self.web.port.reading)
        self.assertFalse(self.pool.webServing())
        web.outReceived(b"ready\n")
        self.assertFalse(self.web.port.reading)
        self.assertTrue(self.pool.webServing())
        self.assertEqual(self.pool.serving(), (2, 1))  # intake processes only
        web.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertTrue(self.web.port.reading)
        self.assertFalse(self.pool.webServing())
        self.clock.advance(1.0)
        restarted = self.webProcess()
        self.assertIsNot(restarted, web)
        self.assertTrue(self.web.port.reading)
        restarted.outReceived(b"ready\n")
        self.assertFalse(self.web.port.reading)

    def test_endedBeforeServing(self) -> None:
        """A web process that never served took nothing over: nothing to give back."""
        self.web.port.reading = False  # as if something else had turned it off
        self.webProcess().processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertFalse(self.web.port.reading)

    def test_noIntakeWorkers(self) -> None:
        """``web.process = "separate"`` with one relay process: the pool runs the web process
        alone."""
        clock = _ProcessClock()
        pool = WorkerPool(
            clock,
            count=0,
            setup=WorkerSetup(None, None),
            listeners=[self.smtp],
            loads=None,
            openConnections=lambda: 0,
            web=WebProcessSetup(self.web, self.forward),
        )
        pool.startService()
        (web,) = clock.spawned
        self.assertEqual((web.protocol.index, web.protocol.name), (1, "web process"))
        self.assertEqual(pool.serving(), (1, 1))


class _Answers(Resource):
    """What the forward reaches: answers by path, and records what it was asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[bytes, bytes, bytes, bytes | None]] = []

    def render(self, request: server.Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        self.asked.append((request.method, request.uri, body, request.getHeader(b"x-sig")))
        if request.path == b"/metrics":
            request.setHeader(b"Content-Type", b"text/plain; version=0.0.4")
            return b"mailrelay_up 1\n"
        request.setResponseCode(405)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Allow", b"POST")
        request.setHeader(b"X-Internal", b"not relayed")
        return b'{"error":{"code":405}}'


class _Forwarding(Resource):
    isLeaf = True

    def __init__(self, forward: MainProcessForward) -> None:
        super().__init__()
        self.forward = forward

    def render(self, request: server.Request) -> Any:
        self.forward(request)
        return server.NOT_DONE_YET


class MainProcessForwardTests(TestCase):
    """The forward over real loopback sockets: a web site standing for the web process,
    handing every request to a site standing for the main process."""

    async def serve(self, resource: Resource) -> int:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            server.Site(resource)
        )
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def forwarding(self, mainPort: int) -> int:
        forward = MainProcessForward(reactor, mainPort)
        self.addCleanup(forward.close)
        return await self.serve(_Forwarding(forward))

    @staticmethod
    def ask(port: int, path: str, data: bytes | None = None) -> Deferred[Any]:
        def get() -> tuple[int, dict[str, str], bytes]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", data=data, headers={"X-Sig": "abc"}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    return answer.status, dict(answer.headers), answer.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read()

        return deferToThread(get)

    async def test_answerRelayed(self) -> None:
        main = _Answers()
        port = await self.forwarding(await self.serve(main))
        code, headers, body = await self.ask(port, "/metrics?x=1")
        self.assertEqual((code, body), (200, b"mailrelay_up 1\n"))
        self.assertEqual(headers["Content-Type"], "text/plain; version=0.0.4")
        self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
        code, headers, body = await self.ask(port, "/dlr/sms", data=b'{"receipt":1}')
        self.assertEqual((code, body), (405, b'{"error":{"code":405}}'))
        self.assertEqual(headers["Allow"], "POST")
        self.assertNotIn("X-Internal", headers)
        self.assertEqual(
            main.asked,
            [
                (b"GET", b"/metrics?x=1", b"", b"abc"),
                (b"POST", b"/dlr/sms", b'{"receipt":1}', b"abc"),
            ],
        )

    async def test_mainProcessNotAnswering(self) -> None:
        port = await self.forwarding(freePort())
        code, _, body = await self.ask(port, "/healthz")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["error"]["code"], 503)
        self.flushLoggedErrors()

    def test_forwardedPaths(self) -> None:
        self.assertEqual(FORWARDED, (["healthz"], ["metrics"], ["dlr", "sms"]))


class WebProcessTests(TestCase):
    """``twistd -n mailrelay`` with ``workers = 2``: the main process, a worker and the web
    process."""

    timeout = 90

    async def startRelay(self, webKind: str = "tcp") -> RelayProcess:
        self.smtpPort = freePort()
        self.webPort = freePort()
        files = RelayFiles(
            Path(self.mktemp()),
            [Listener("network", "none", "network", f"tcp:{self.smtpPort}:interface=127.0.0.1")],
            webEndpoint=f"{webKind}:{self.webPort}:interface=127.0.0.1",
            workers=2,
        )
        await addAccountByIP(files)
        relay = RelayProcess(files, "web-process")
        await deferToThread(relay.start)
        self.addCleanup(self.stopAll, relay)
        await deferToThread(relay.waitUntilServing, self.smtpPort)
        await deferToThread(waitForLog, relay, "worker 1 serving")
        await deferToThread(waitForLog, relay, "web process serving")
        return relay

    def stopAll(self, relay: RelayProcess) -> Deferred[Any]:
        def stop() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(mainPid(relay), signal.SIGCONT)
            relay.signal(signal.SIGKILL)
            for pid in webPids(relay):
                if _running(pid):
                    os.kill(pid, signal.SIGKILL)

        return deferToThread(stop)

    def get(self, path: str, timeout: float = 10) -> Deferred[tuple[int, bytes]]:
        def get() -> tuple[int, bytes]:
            login = base64.b64encode(f"{ACCOUNT}:{PASSWORD}".encode()).decode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.webPort}{path}",
                headers={"Authorization": f"Basic {login}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=timeout) as answer:
                    return answer.status, answer.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        return deferToThread(get)

    async def test_statusAnsweredWhileTheMainProcessIsStopped(self) -> None:
        """The status API is the web process's: it answers with the main process stopped
        (SIGSTOP), while the main process's own answers (/healthz) come through it."""
        relay = await self.startRelay()
        code, body = await self.get("/healthz")
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["workers"], {"configured": 2, "serving": 2})
        self.assertEqual(json.loads(body)["web_process"], {"serving": True})
        notificationId = await deferToThread(submitOne, self.smtpPort)
        os.kill(mainPid(relay), signal.SIGSTOP)
        try:
            code, body = await self.get(f"/{ACCOUNT}/notifications/id/{notificationId}")
            self.assertEqual(code, 200, body)
            (received,) = json.loads(body)["SAPnotification"]["status"]
            self.assertEqual(received["statusCode"], "CAAS_RECEIVED")
            code, body = await self.get(f"/{ACCOUNT}/notifications/id/1")
            self.assertEqual((code, json.loads(body)["SAPnotification"]["status"]), (200, []))
        finally:
            os.kill(mainPid(relay), signal.SIGCONT)
        code, body = await self.get("/healthz")
        self.assertEqual(code, 200, body)
        # A reload reaches the web process too.
        os.kill(mainPid(relay), signal.SIGHUP)
        await deferToThread(waitForLog, relay, "reloaded", 3)
        reloaded = [line for line in relay.log().splitlines() if line.endswith("reloaded")]
        self.assertEqual(len([line for line in reloaded if "web process: " in line]), 1)

    async def test_webProcessRestarted(self) -> None:
        """The web process killed: the main process answers the endpoint meanwhile, and the
        web process is started again and takes it back."""
        relay = await self.startRelay()
        (first,) = webPids(relay)
        os.kill(first, signal.SIGKILL)
        await deferToThread(waitForLog, relay, f"web process (pid {first}) ended")
        code, body = await self.get("/healthz")  # answered by the main process
        self.assertEqual(code, 200, body)
        # (started again after RESTART_DELAY, and serving once it has opened the store)
        self.assertEqual(json.loads(body)["web_process"], {"serving": False})
        await deferToThread(waitForLog, relay, "web process serving", 2)
        pids = webPids(relay)
        self.assertEqual(len(pids), 2)
        code, body = await self.get(f"/{ACCOUNT}/notifications/id/1")
        self.assertEqual((code, json.loads(body)["SAPnotification"]["status"]), (200, []))
        status = await deferToThread(relay.signal, signal.SIGTERM, 30)
        self.assertIn(status, (0, -signal.SIGTERM), relay.log())
        self.assertFalse(_running(pids[1]), "the web process outlived the relay")
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", self.webPort), timeout=1).close()

    async def test_behindHAProxy(self) -> None:
        """A ``haproxy:`` web endpoint: the web process reads the PROXY header first, so the
        realm sees the client's address (the account's networks are 127.0.0.0/8)."""
        relay = await self.startRelay("haproxy:tcp")
        os.kill(mainPid(relay), signal.SIGSTOP)  # the answers are the web process's
        try:
            inside = await deferToThread(self.behindProxy, "127.0.0.5")
            outside = await deferToThread(self.behindProxy, "203.0.113.9")
        finally:
            os.kill(mainPid(relay), signal.SIGCONT)
        self.assertTrue(inside.startswith(b"HTTP/1.1 200 "), inside)
        self.assertTrue(outside.startswith(b"HTTP/1.1 401 "), outside)

    def behindProxy(self, client: str) -> bytes:
        """Blocking: a status request as HAProxy would pass it on for ``client``; the answer."""
        login = base64.b64encode(f"{ACCOUNT}:{PASSWORD}".encode()).decode()
        request = (
            f"PROXY TCP4 {client} 127.0.0.1 40000 {self.webPort}\r\n"
            f"GET /{ACCOUNT}/notifications/id/1 HTTP/1.1\r\nHost: relay\r\n"
            f"Authorization: Basic {login}\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", self.webPort), timeout=10) as connection:
            connection.sendall(request.encode())
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        return answer


def mainPid(relay: RelayProcess) -> int:
    assert relay.process is not None
    return relay.process.pid


def webPids(relay: RelayProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"web process started \(pid (\d+)\)", relay.log())]


def submitOne(port: int) -> str:
    """Blocking: one message submitted over SMTP; its notification id."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail(SENDER)[0] == 250
        assert smtp.rcpt("someone@customer.example")[0] == 250
        code, text = smtp.data(f"From: {SENDER}\r\nSubject: status\r\n\r\nHello\r\n".encode())
    match = ACCEPTED.search(text)
    assert code == 250 and match, (code, text)
    return match.group(1).decode()


def waitForLog(relay: RelayProcess, text: str, count: int = 1) -> None:
    relay.waitForLog(text, count)
