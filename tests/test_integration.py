"""
The "must show" of issue 2 with real parts: the relay's service tree on real sockets, real TLS
handshakes verified against a test CA, the real SQLite store, and real clients (smtplib, swaks,
openssl s_client, raw sockets, twistd as a child process killed with SIGKILL). No mocks.

Blocking clients run in threads (``deferToThread``) while the reactor serves the relay.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import smtplib
import ssl
import sys
import tempfile
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.model import API_KEY_USER
from mailrelay.smtp import replies
from tests.relay_fixture import (
    ACCOUNT,
    CLIENT_TIMEOUT,
    HOSTNAME,
    PASSWORD,
    SENDER,
    Listener,
    RelayFiles,
    RelayProcess,
    RunningRelay,
    WireClient,
    addAccount,
    freePort,
    runCommand,
    startRelay,
)

ACCEPTED = re.compile(r"2\.0\.0 OK id=(\d+)")
"""The text of ``250 2.0.0 OK id=<notificationId>``."""

RECIPIENTS = ("alice@customer.example", "bob@customer.example")


def makeMessage(subject: str, recipients: tuple[str, ...] = RECIPIENTS) -> EmailMessage:
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message.set_content(f"Hello from the integration test {subject!r}.\n")
    return message


def wireMessage(subject: str) -> bytes:
    """A message as DATA carries it: CRLF line endings, ending with the end-of-data marker."""
    return f"From: {SENDER}\r\nSubject: {subject}\r\n\r\nHello.\r\n.\r\n".encode()


def acceptedId(text: str) -> str:
    """The notification id in an accepted DATA reply's text; fails on any other text."""
    match = ACCEPTED.fullmatch(text.strip())
    if match is None:
        raise AssertionError(f"not an accepted-message reply: {text!r}")
    return match.group(1)


class _KeepsDataReply:
    """smtplib's send_message throws away the DATA reply; keep it, it carries the id."""

    dataReply: tuple[int, bytes] | None = None

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.dataReply = super().data(msg)  # type: ignore[misc]
        return self.dataReply


class RecordingSMTP(_KeepsDataReply, smtplib.SMTP):
    pass


class RecordingSMTPOverTLS(_KeepsDataReply, smtplib.SMTP_SSL):
    pass


class RelayTestCase(TestCase):
    """Each test gets its own relay (all four listener kinds) and account."""

    timeout = 30
    relay: RunningRelay

    async def setUp(self) -> None:  # type: ignore[override]
        self.relay = await startRelay(self)

    def clientContext(self) -> ssl.SSLContext:
        return self.relay.files.clientContext()

    async def assertStored(self, notificationId: str, recipients: tuple[str, ...]) -> None:
        """The notification is in the store with these recipients, each CAAS_RECEIVED."""
        store = self.relay.store
        notification = await store.getNotification(notificationId)
        if notification is None:
            self.fail(f"notification {notificationId} not stored")
        self.assertEqual(notification.account, ACCOUNT)
        self.assertEqual(tuple(r.address for r in notification.recipients), recipients)
        trail = await store.statusTrail(notificationId)
        self.assertEqual(
            [(event.recipient.address, event.status_code) for event in trail],
            [(recipient, "CAAS_RECEIVED") for recipient in recipients],
        )

    def assertReply(self, reply: Any, expected: replies.Reply) -> None:
        self.assertTrue(
            reply.matches(expected),
            f"expected {expected.code} {expected.enhanced}, got {reply.code} {reply.text!r}",
        )


class SmtplibTests(RelayTestCase):
    """Python's smtplib, as a customer's application would use it."""

    async def test_starttlsWithPassword(self) -> None:
        """STARTTLS (certificate verified) + AUTH PLAIN with the account's password."""
        port = self.relay.ports["starttls"]
        context = self.clientContext()

        def submit() -> tuple[dict[str, Any], tuple[int, bytes] | None, str | None]:
            with RecordingSMTP(
                "127.0.0.1", port, local_hostname="client.test", timeout=CLIENT_TIMEOUT
            ) as smtp:
                smtp.starttls(context=context)
                smtp.login(ACCOUNT, PASSWORD)
                refused = smtp.send_message(makeMessage("smtplib starttls"))
                assert isinstance(smtp.sock, ssl.SSLSocket)
                return refused, smtp.dataReply, smtp.sock.version()

        refused, dataReply, version = await deferToThread(submit)
        self.assertEqual(refused, {})
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        assert dataReply is not None
        self.assertEqual(dataReply[0], 250)
        await self.assertStored(acceptedId(dataReply[1].decode()), RECIPIENTS)

    async def test_implicitTLSWithApiKey(self) -> None:
        """Implicit TLS (SMTP_SSL) + AUTH LOGIN as ``App`` with the API key."""
        port = self.relay.ports["tls"]
        context = self.clientContext()
        apiKey = self.relay.apiKey

        def submit() -> tuple[dict[str, Any], tuple[int, bytes] | None]:
            with RecordingSMTPOverTLS(
                "127.0.0.1",
                port,
                local_hostname="client.test",
                context=context,
                timeout=CLIENT_TIMEOUT,
            ) as smtp:
                smtp.ehlo()
                smtp.user, smtp.password = API_KEY_USER, apiKey
                code, _ = smtp.auth("LOGIN", smtp.auth_login)
                self.assertEqual(code, 235)
                refused = smtp.send_message(makeMessage("smtplib implicit tls"))
                return refused, smtp.dataReply

        refused, dataReply = await deferToThread(submit)
        self.assertEqual(refused, {})
        assert dataReply is not None
        self.assertEqual(dataReply[0], 250)
        await self.assertStored(acceptedId(dataReply[1].decode()), RECIPIENTS)


class SwaksTests(RelayTestCase):
    """swaks, the SMTP test tool a new user reaches for, verifying the certificate."""

    def setUp(self) -> Any:
        swaks = shutil.which("swaks")
        if swaks is None:
            raise SkipTest("swaks is not installed")
        self.swaks = swaks
        return super().setUp()

    async def submitWithSwaks(self, listener: str, user: str, password: str) -> None:
        tlsOption = "--tls" if listener == "starttls" else "--tls-on-connect"
        command = [
            self.swaks,
            "--server", f"127.0.0.1:{self.relay.ports[listener]}",
            tlsOption,
            "--tls-verify",
            "--tls-ca-path", str(self.relay.caPath),
            "--auth", "PLAIN",
            "--auth-user", user,
            "--auth-password", password,
            "--ehlo", "client.test",
            "--from", SENDER,
            "--to", RECIPIENTS[0],
            "--header", f"Subject: swaks over {listener}",
            "--timeout", "10",
        ]  # fmt: skip
        result = await runCommand(command)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        match = re.search(r"^<~ +250 (2\.0\.0 OK id=\d+)\s*$", output, re.MULTILINE)
        self.assertIsNotNone(match, output)
        assert match is not None
        await self.assertStored(acceptedId(match.group(1)), RECIPIENTS[:1])

    def test_starttlsWithPassword(self) -> Any:
        return self.submitWithSwaks("starttls", ACCOUNT, PASSWORD)

    def test_starttlsWithApiKey(self) -> Any:
        return self.submitWithSwaks("starttls", API_KEY_USER, self.relay.apiKey)

    def test_implicitTLSWithPassword(self) -> Any:
        return self.submitWithSwaks("tls", ACCOUNT, PASSWORD)

    def test_implicitTLSWithApiKey(self) -> Any:
        return self.submitWithSwaks("tls", API_KEY_USER, self.relay.apiKey)


class TLSTests(RelayTestCase):
    """Handshakes: TLS 1.2+ on both TLS listener kinds, nothing older, nothing in the clear."""

    async def openssl(self, *arguments: str, input: str = "QUIT\n") -> str:
        """Run ``openssl s_client``, verifying the certificate; returns its output."""
        if shutil.which("openssl") is None:
            raise SkipTest("openssl is not installed")
        command = [
            "openssl", "s_client",
            "-CAfile", str(self.relay.caPath),
            "-verify_return_error",
            "-verify_hostname", HOSTNAME,
            "-servername", HOSTNAME,
            "-brief",
            "-crlf",  # so the QUIT line below goes out as QUIT<CRLF>
            "-ign_eof",  # read on until the relay answers QUIT and closes
            *arguments,
        ]  # fmt: skip
        result = await runCommand(command, input)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        return output

    def assertModernTLS(self, opensslOutput: str) -> None:
        self.assertRegex(opensslOutput, r"Protocol version: TLSv1\.[23]\b")
        self.assertIn("Verification: OK", opensslOutput)

    async def test_opensslStarttls(self) -> None:
        port = self.relay.ports["starttls"]
        output = await self.openssl("-connect", f"127.0.0.1:{port}", "-starttls", "smtp")
        self.assertModernTLS(output)
        self.assertIn("221 2.0.0", output)

    async def test_opensslImplicitTLS(self) -> None:
        port = self.relay.ports["tls"]
        output = await self.openssl("-connect", f"127.0.0.1:{port}")
        self.assertModernTLS(output)
        self.assertIn(f"220 {HOSTNAME} ESMTP", output)
        self.assertIn("221 2.0.0", output)

    def handshake(self, listener: str, maximum: ssl.TLSVersion) -> str:
        """Blocking: a TLS handshake with the listener at most at ``maximum``; the version."""
        context = self.clientContext()
        context.maximum_version = maximum
        if maximum < ssl.TLSVersion.TLSv1_2:
            # Let our own side offer the old protocol, so the refusal can only be the relay's.
            context.minimum_version = maximum
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with WireClient(self.relay.ports[listener]) as client:
            if listener == "starttls":
                client.reply()
                client.command("EHLO client.test")
                self.assertEqual(client.command("STARTTLS").code, 220)
            client.startTLS(context)
            assert isinstance(client.sock, ssl.SSLSocket)
            return str(client.sock.version())

    async def test_tls12Accepted(self) -> None:
        """A client that can do at most TLS 1.2 is served on both listener kinds."""
        for listener in ("starttls", "tls"):
            version = await deferToThread(self.handshake, listener, ssl.TLSVersion.TLSv1_2)
            self.assertEqual(version, "TLSv1.2")

    def handshakeWithCiphers(self, ciphers: str) -> str:
        """Blocking: a TLS 1.2 handshake with the implicit-TLS listener offering only
        ``ciphers``; the cipher agreed."""
        context = self.clientContext()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers + ":@SECLEVEL=0")
        with WireClient(self.relay.ports["tls"]) as client:
            client.startTLS(context)
            assert isinstance(client.sock, ssl.SSLSocket)
            cipher = client.sock.cipher()
            assert cipher is not None
            return cipher[0]

    async def test_tls12OnlyForwardSecretAEAD(self) -> None:
        """TLS 1.2 without forward secrecy (static RSA key exchange) or with CBC and SHA-1 is
        refused; ECDHE with AES-GCM is served."""
        agreed = await deferToThread(self.handshakeWithCiphers, "ECDHE+AESGCM")
        self.assertIn("GCM", agreed)
        for weak in ("AES128-SHA:AES256-SHA:AES128-GCM-SHA256", "ECDHE+SHA1", "ECDHE+AES+SHA256"):
            with self.assertRaises(ssl.SSLError, msg=weak):
                await deferToThread(self.handshakeWithCiphers, weak)

    async def test_tls11Refused(self) -> None:
        """A client limited to TLS 1.1 gets a protocol-version alert from the relay."""
        for listener in ("starttls", "tls"):
            with self.assertRaises(ssl.SSLError) as caught:
                await deferToThread(self.handshake, listener, ssl.TLSVersion.TLSv1_1)
            # Not our own side refusing to offer TLS 1.1 (that would be NO_PROTOCOLS_AVAILABLE).
            self.assertEqual(caught.exception.reason, "TLSV1_ALERT_PROTOCOL_VERSION")

    async def test_implicitTLSNoCleartextGreeting(self) -> None:
        """A plaintext client on the implicit-TLS listener never sees an SMTP greeting."""

        def plaintextClient() -> bytes:
            with WireClient(self.relay.ports["tls"]) as client:
                client.send(b"EHLO client.test\r\n")
                return client.readUntilClosed()

        received = await deferToThread(plaintextClient)
        self.assertNotIn(b"220", received)
        self.assertNotIn(b"ESMTP", received)

    async def test_plaintextAuthRefused(self) -> None:
        """Without TLS on a starttls listener AUTH is not offered, and refused with 538 even
        with the right password."""

        def plaintextSession() -> tuple[Any, Any, Any]:
            with WireClient(self.relay.ports["starttls"]) as client:
                greeting = client.reply()
                self.assertEqual(greeting.text, f"{HOSTNAME} ESMTP")
                ehlo = client.command("EHLO client.test")
                plain = client.login(ACCOUNT, PASSWORD)
                login = client.command("AUTH LOGIN")
                return ehlo, plain, login

        ehlo, plain, login = await deferToThread(plaintextSession)
        self.assertEqual(ehlo.code, 250)
        self.assertIn("STARTTLS", ehlo.lines)
        self.assertFalse([line for line in ehlo.lines if line.upper().startswith("AUTH")])
        self.assertReply(plain, replies.ENCRYPTION_REQUIRED)
        self.assertReply(login, replies.ENCRYPTION_REQUIRED)

    async def test_starttlsInjectionDiscarded(self) -> None:
        """
        RFC 3207 §4.2: a command pipelined behind STARTTLS in the clear is thrown away, and
        the session starts over inside TLS.
        """
        context = self.clientContext()

        def injectingClient() -> tuple[Any, Any, Any]:
            with WireClient(self.relay.ports["starttls"]) as client:
                client.reply()
                client.command("EHLO client.test")
                client.send(b"STARTTLS\r\nNOOP\r\n")
                ready = client.reply()
                # startTLS also fails if anything beyond the 220 arrived in the clear.
                client.startTLS(context)
                ehlo = client.command("EHLO client.test")
                mail = client.command(f"MAIL FROM:<{SENDER}>")
                return ready, ehlo, mail

        ready, ehlo, mail = await deferToThread(injectingClient)
        self.assertReply(ready, replies.READY_TLS)
        # The first reply inside TLS answers the EHLO, not the injected NOOP (250 2.0.0 OK).
        self.assertEqual(ehlo.code, 250)
        self.assertEqual(ehlo.lines[0], f"{HOSTNAME} greets client.test")
        self.assertIn("AUTH PLAIN LOGIN", ehlo.lines)
        self.assertNotIn("STARTTLS", ehlo.lines)
        self.assertReply(mail, replies.AUTH_REQUIRED)

    async def test_starttlsForgetsEHLO(self) -> None:
        """After STARTTLS the client must say EHLO again: MAIL straight away is out of order."""
        context = self.clientContext()

        def client() -> Any:
            with WireClient(self.relay.ports["starttls"]) as client:
                client.reply()
                client.command("EHLO client.test")
                self.assertEqual(client.command("STARTTLS").code, 220)
                client.startTLS(context)
                return client.command(f"MAIL FROM:<{SENDER}>")

        mail = await deferToThread(client)
        self.assertReply(mail, replies.BAD_SEQUENCE)

    async def test_plainListenerOffersNoAuth(self) -> None:
        """A ``security = "none"`` listener offers neither STARTTLS nor AUTH, and needs AUTH."""

        def plainSession() -> tuple[Any, Any, Any, Any]:
            with WireClient(self.relay.ports["plain"]) as client:
                client.reply()
                ehlo = client.command("EHLO client.test")
                starttls = client.command("STARTTLS")
                auth = client.login(ACCOUNT, PASSWORD)
                mail = client.command(f"MAIL FROM:<{SENDER}>")
                return ehlo, starttls, auth, mail

        ehlo, starttls, auth, mail = await deferToThread(plainSession)
        self.assertEqual(ehlo.code, 250)
        self.assertFalse([line for line in ehlo.lines if line.startswith(("AUTH", "STARTTLS"))])
        self.assertReply(starttls, replies.NOT_IMPLEMENTED)
        self.assertReply(auth, replies.ENCRYPTION_REQUIRED)
        self.assertReply(mail, replies.AUTH_REQUIRED)


class PipeliningTests(RelayTestCase):
    """PIPELINING: many commands in one write, replies in order."""

    def pipelinedSession(self, recipients: list[str]) -> tuple[list[Any], Any]:
        """Blocking: AUTH, then MAIL + every RCPT + DATA in one write; the replies."""
        with WireClient(self.relay.ports["tls"]) as client:
            client.startTLS(self.clientContext())
            client.reply()
            self.assertEqual(client.command("EHLO client.test").code, 250)
            self.assertReply(client.loginWithApiKey(self.relay.apiKey), replies.AUTH_OK)
            commands = [f"MAIL FROM:<{SENDER}>"]
            commands += [f"RCPT TO:<{recipient}>" for recipient in recipients]
            commands.append("DATA")
            client.send("".join(f"{command}\r\n" for command in commands).encode())
            pipelined = client.replies(len(commands))
            client.send(wireMessage("pipelined"))
            accepted = client.reply()
            client.command("QUIT")
            return pipelined, accepted

    async def test_fiftyRecipients(self) -> None:
        recipients = [f"user{i}@customer.example" for i in range(50)]
        pipelined, accepted = await deferToThread(self.pipelinedSession, recipients)
        self.assertEqual(len(pipelined), 52)
        self.assertReply(pipelined[0], replies.SENDER_OK)
        for reply in pipelined[1:51]:
            self.assertReply(reply, replies.RECIPIENT_OK)
        self.assertEqual(pipelined[51].code, replies.START_DATA.code)
        self.assertReply(accepted, replies.ACCEPTED)
        await self.assertStored(acceptedId(accepted.text), tuple(recipients))

    async def test_invalidRecipientInTheMiddle(self) -> None:
        """One bad RCPT among fifty gets its refusal in its place; the others still 250."""
        recipients = [f"user{i}@customer.example" for i in range(50)]
        recipients[25] = "nobody"
        pipelined, accepted = await deferToThread(self.pipelinedSession, recipients)
        codes = [reply.code for reply in pipelined]
        self.assertEqual(codes, [250] * 26 + [553] + [250] * 24 + [354])
        self.assertReply(pipelined[26], replies.BAD_RECIPIENT_SYNTAX)
        self.assertReply(accepted, replies.ACCEPTED)
        valid = tuple(r for r in recipients if r != "nobody")
        await self.assertStored(acceptedId(accepted.text), valid)


class RelayByNetworkTests(RelayTestCase):
    """``auth = "network"``: the account whose networks hold the client submits without AUTH."""

    def submitWithoutAuth(self) -> tuple[Any, Any]:
        """Blocking: MAIL on the network listener without AUTH, and DATA if MAIL is accepted."""
        with WireClient(self.relay.ports["network"]) as client:
            client.reply()
            client.command("EHLO erp.customer.example")
            mail = client.command(f"MAIL FROM:<{SENDER}>")
            if mail.code != 250:
                return mail, None
            self.assertReply(client.command(f"RCPT TO:<{RECIPIENTS[0]}>"), replies.RECIPIENT_OK)
            self.assertEqual(client.command("DATA").code, 354)
            client.send(wireMessage("relay by IP"))
            return mail, client.reply()

    async def test_accountNetworkSubmitsWithoutAuth(self) -> None:
        await self.relay.updateAccount(networks=("127.0.0.0/8",))
        mail, accepted = await deferToThread(self.submitWithoutAuth)
        self.assertReply(mail, replies.SENDER_OK)
        self.assertReply(accepted, replies.ACCEPTED)
        await self.assertStored(acceptedId(accepted.text), RECIPIENTS[:1])

    async def test_noAccountForNetwork(self) -> None:
        mail, _ = await deferToThread(self.submitWithoutAuth)
        self.assertReply(mail, replies.AUTH_REQUIRED)


NOBODY = 65534


class _RelayAsNobody(RelayProcess):
    """The relay process started by root with ``twistd --uid 65534 --gid 65534``."""

    @staticmethod
    def command(configPath: Path) -> list[str]:
        command = RelayProcess.command(configPath)
        at = command.index("mailrelay")
        return [*command[:at], "--uid", str(NOBODY), "--gid", str(NOBODY), *command[at:]]


class RelayProcessTests(TestCase):
    """``twistd -n mailrelay`` as a real process: config errors, and a crash losing nothing."""

    timeout = 30

    async def test_badConfigNamesTheKey(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        configPath = directory / "bad.toml"
        configPath.write_text("[limits]\nmax_recipents = 5\n")
        result = await runCommand(RelayProcess.command(configPath))
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn("limits.max_recipents", output)

    async def test_unusableStoreFailsTheStart(self) -> None:
        """A store that cannot be opened ends twistd with a failure status, naming the cause."""
        files = RelayFiles(Path(self.mktemp()), [Listener("starttls", "starttls")])
        (files.dataDir / "mailrelay.sqlite3").mkdir(parents=True)  # a directory, not a database
        relay = RelayProcess(files)
        await deferToThread(relay.start)
        self.addCleanup(deferToThread, relay.signal, signal.SIGKILL)
        status = await deferToThread(relay.process.wait, 20)  # type: ignore[union-attr]
        self.assertIn("unable to open database file", relay.log())
        self.assertNotEqual(status, 0, relay.log())

    async def test_runsAsTheUserOfTwistdUid(self) -> None:
        """
        Started as root with ``twistd --uid/--gid``, the relay binds as root and then runs as
        that user, on a data_dir made as root (with a database the admin command line, run as
        root, made): it hands them over, and the store opens and keeps a message.
        """
        if os.geteuid() != 0:
            raise SkipTest("twistd --uid needs root")
        # Everything the relay needs is imported before twistd drops root, so this runs
        # wherever the user may not read this tree or this Python.
        base = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, base, True)
        files, port = await self.makeRelayFiles(base / "relay")
        for directory in (base, files.directory):
            directory.chmod(0o755)  # so that the user can reach data_dir
        self.assertEqual((files.dataDir / "mailrelay.sqlite3").stat().st_uid, 0)
        relay = _RelayAsNobody(files, "as-nobody")
        await deferToThread(relay.start)
        self.addCleanup(deferToThread, relay.signal, signal.SIGKILL)
        await deferToThread(relay.waitUntilServing, port)
        notificationId = await deferToThread(self.submit, files, port, "as nobody")
        self.assertTrue(notificationId)
        assert relay.process is not None
        status = Path(f"/proc/{relay.process.pid}/status").read_text()
        self.assertIn(f"Uid:\t{NOBODY}\t{NOBODY}", status)
        for path in (files.dataDir, files.dataDir / "mailrelay.sqlite3"):
            self.assertEqual(path.stat().st_uid, NOBODY, path)

    async def startProcess(self, files: RelayFiles, port: int, name: str) -> RelayProcess:
        """A relay process, listening on ``port``; killed at cleanup if still running."""
        process = RelayProcess(files, name)
        await deferToThread(process.start)
        self.addCleanup(deferToThread, process.signal, signal.SIGKILL)
        await deferToThread(process.waitUntilServing, port)
        return process

    async def makeRelayFiles(self, directory: Path | None = None) -> tuple[RelayFiles, int]:
        """Files for a relay process with one STARTTLS listener and the test account."""
        port = freePort()
        files = RelayFiles(
            directory or Path(self.mktemp()),
            [Listener("starttls", "starttls", endpoint=f"tcp:{port}")],
        )
        store = files.makeStore()
        await store.open()
        try:
            await addAccount(store)
        finally:
            await store.close()
        return files, port

    def submit(self, files: RelayFiles, port: int, subject: str) -> str:
        """Blocking: submit one message over STARTTLS with the password; its notification id."""
        with RecordingSMTP(
            "127.0.0.1", port, local_hostname="client.test", timeout=CLIENT_TIMEOUT
        ) as smtp:
            smtp.starttls(context=files.clientContext())
            smtp.login(ACCOUNT, PASSWORD)
            smtp.send_message(makeMessage(subject))
            assert smtp.dataReply is not None
            return acceptedId(smtp.dataReply[1].decode())

    async def killAfterSubmitting(self) -> tuple[RelayFiles, int, str]:
        """
        Start a relay process, submit one message, and SIGKILL the relay as soon as the 250
        came back. Returns the relay's files, its port and the message's notification id.
        """
        files, port = await self.makeRelayFiles()
        relay = await self.startProcess(files, port, "killed")
        notificationId = await deferToThread(self.submit, files, port, "survives kill -9")
        status = await deferToThread(relay.signal, signal.SIGKILL)
        self.assertEqual(status, -signal.SIGKILL)
        return files, port, notificationId

    async def test_acceptedMessageSurvivesSIGKILL(self) -> None:
        """A message that got its 250 is queued, body and all, after kill -9 and a restart."""
        files, port, notificationId = await self.killAfterSubmitting()
        restarted = await self.startProcess(files, port, "restarted")
        # The restarted relay works on the store the killed one left behind.
        laterId = await deferToThread(self.submit, files, port, "after the restart")
        self.assertGreater(int(laterId), int(notificationId))
        # twistd ends by re-raising the signal that stopped it, so -SIGTERM is a clean exit.
        status = await deferToThread(restarted.signal, signal.SIGTERM)
        self.assertIn(status, (0, -signal.SIGTERM), restarted.log())
        self.assertIn("Server Shut Down", restarted.log())

        store = files.makeStore()
        await store.open()
        self.addCleanup(store.close)
        notification = await store.getNotification(notificationId)
        if notification is None:
            self.fail(f"notification {notificationId} lost")
        self.assertEqual([r.address for r in notification.recipients], list(RECIPIENTS))
        stats = await store.stats()
        self.assertEqual((stats.queued, stats.deferred, stats.in_flight), (2, 0, 0))
        trail = await store.statusTrail(notificationId)
        self.assertEqual([event.status_code for event in trail], ["CAAS_RECEIVED"] * 2)
        entries = {
            entry.notification.notification_id: entry for entry in await store.claimDue(10, 60)
        }
        self.assertEqual(set(entries), {notificationId, laterId})
        self.assertIn(b"Subject: survives kill -9", entries[notificationId].message)
        self.assertIn(b"Hello from the integration test", entries[notificationId].message)

    async def test_killedMessageShownByAdminCommand(self) -> None:
        """``mailrelay status ID --json`` and ``queue stats --json`` beside the restarted relay."""
        if importlib.util.find_spec("mailrelay.cli") is None:
            raise SkipTest("the mailrelay admin command (mailrelay.cli) has not landed")
        files, port, notificationId = await self.killAfterSubmitting()
        await self.startProcess(files, port, "restarted")

        async def admin(*arguments: str) -> Any:
            command = [sys.executable, "-m", "mailrelay.cli", "--config", str(files.configPath)]
            result = await runCommand([*command, *arguments, "--json"])
            self.assertEqual(result.returncode, 0, result.stderr)
            return json.loads(result.stdout)

        document = await admin("status", notificationId)
        trail = document["SAPnotification"]
        self.assertEqual(trail["notificationId"], notificationId)
        self.assertEqual(
            [(event["recipient"], event["statusCode"]) for event in trail["status"]],
            [(f"email:{recipient}", "CAAS_RECEIVED") for recipient in RECIPIENTS],
        )
        stats = await admin("queue", "stats")
        self.assertEqual(stats["queued"], 1)
