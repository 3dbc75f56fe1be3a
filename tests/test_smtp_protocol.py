"""
Tests for mailrelay.smtp.protocol: every reply of SPEC §4's table, on a StringTransport.

The protocol runs with the real portal and avatar over the in-memory store of
mailrelay.testing (tests.smtp_fixture.MemoryProtocolHarness): every reply is written before
``dataReceived`` returns, and time is a ``task.Clock``; no threads, files or reactor.

Most tests compare against the named constants of mailrelay.smtp.replies (code and enhanced
code); where the protocol sends those same constants, the wire text is checked as well.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import ServerFactory
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailrelay.smtp import replies
from mailrelay.smtp.listener import SubmissionFactory
from mailrelay.smtp.replies import Reply
from mailrelay.submission import LOGIN_RECHECK_SECONDS
from tests.smtp_fixture import ACCOUNT, PASSWORD, SENDER_DOMAIN, MemoryProtocolHarness, plain

FROM = f"<app@{SENDER_DOMAIN}>"
HEADER = f"From: app@{SENDER_DOMAIN}\r\n"
_ACCEPTED = re.compile(r"^250 2\.0\.0 OK id=(\d+)$")


def assertReply(testCase: TestCase, line: str, reply: Reply) -> None:
    """``line`` carries ``reply``'s code and enhanced code."""
    expected = f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} "
    testCase.assertTrue(line.startswith(expected), f"{line!r} is not {expected!r}")


class ProtocolTestCase(TestCase):
    limits: dict[str, Any] = {"max_message_size": 2000, "max_recipients": 60}

    @inlineCallbacks
    def setUp(self) -> Any:
        self.harness = MemoryProtocolHarness(self, self.limits)
        yield self.harness.start()
        self.session = self.harness.connect()

    def assertReply(self, line: str, reply: Reply) -> None:
        assertReply(self, line, reply)

    @inlineCallbacks
    def queued(self) -> Any:
        stats = yield self.harness.store.stats()
        return stats.queued


class GreetingAndSimpleCommandsTests(ProtocolTestCase):
    def test_greeting(self) -> None:
        self.assertEqual(self.session.greeting, ["220 relay.test ESMTP"])

    @inlineCallbacks
    def test_ehloAdvertisesExtensions(self) -> Any:
        lines = yield self.session.send("EHLO client.test\r\n")
        self.assertEqual(lines[0], "250-relay.test greets client.test")
        keywords = [line[4:] for line in lines[1:]]
        for keyword in ("PIPELINING", "SIZE 2000", "8BITMIME", "ENHANCEDSTATUSCODES", "HELP"):
            self.assertIn(keyword, keywords)
        self.assertIn("AUTH PLAIN LOGIN", keywords)  # this listener allows plaintext auth
        self.assertNotIn("STARTTLS", keywords)  # a "none" listener
        self.assertTrue(lines[-1].startswith("250 "))

    @inlineCallbacks
    def test_helo(self) -> Any:
        reply = yield self.session.command("HELO client.test")
        self.assertEqual(reply, "250 relay.test")

    @inlineCallbacks
    def test_noopAndRset(self) -> Any:
        """What the client reads, to the letter: the wire, not the constant table (which the
        protocol sends from, so comparing with it alone says nothing of the table)."""
        noop = yield self.session.command("NOOP")
        self.assertReply(noop, replies.OK)
        rset = yield self.session.command("RSET")
        self.assertReply(rset, replies.OK)
        self.assertEqual(noop, "250 2.0.0 OK")
        self.assertEqual(rset, "250 2.0.0 OK")

    @inlineCallbacks
    def test_vrfy(self) -> Any:
        reply = yield self.session.command("VRFY postmaster")
        self.assertReply(reply, replies.VRFY_CANNOT)
        self.assertTrue(reply.startswith("252 2.5.2 "))

    @inlineCallbacks
    def test_help(self) -> Any:
        reply = yield self.session.command("HELP")
        self.assertTrue(reply.startswith("214 "))

    @inlineCallbacks
    def test_quit(self) -> Any:
        reply = yield self.session.command("QUIT")
        self.assertTrue(reply.startswith("221 2.0.0 "))
        self.assertTrue(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_unknownCommand(self) -> Any:
        reply = yield self.session.command("FROBNICATE now")
        self.assertTrue(reply.startswith("500 5.5.1 "))

    @inlineCallbacks
    def test_commandsAreCaseInsensitive(self) -> Any:
        self.assertReply((yield self.session.command("noop")), replies.OK)

    @inlineCallbacks
    def test_lineTooLong(self) -> Any:
        reply = yield self.session.command("NOOP " + "x" * 13000)
        self.assertTrue(reply.startswith("500 5.5.2 "))
        self.assertReply((yield self.session.command("NOOP")), replies.OK)

    @inlineCallbacks
    def test_endlessLineIsNotBuffered(self) -> Any:
        for _ in range(20):
            self.session.protocol.dataReceived(b"x" * 4096)
        self.assertLess(len(self.session.protocol._buffer), 13000)
        lines = yield self.session.send("\r\nNOOP\r\n")
        self.assertTrue(lines[0].startswith("500 5.5.2 "))
        self.assertReply(lines[-1], replies.OK)

    @inlineCallbacks
    def test_httpRequestClosesConnection(self) -> Any:
        yield self.session.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_tooManyProtocolErrorsClose(self) -> Any:
        lines = yield self.session.send("BOGUS\r\n" * 25, replies=21)
        self.assertReply(lines[-1], replies.TOO_MANY_ERRORS)
        self.assertTrue(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_invalidUTF8(self) -> Any:
        lines = yield self.session.send(b"MAIL FROM:<\xff@x>\r\n")
        self.assertTrue(lines[-1].startswith("501 5.5.4 "))


class OrderAndSyntaxTests(ProtocolTestCase):
    @inlineCallbacks
    def test_mailBeforeHelo(self) -> Any:
        self.assertReply((yield self.session.command(f"MAIL FROM:{FROM}")), replies.BAD_SEQUENCE)

    @inlineCallbacks
    def test_mailBeforeAuth(self) -> Any:
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command(f"MAIL FROM:{FROM}")
        self.assertTrue(reply.startswith("530 5.7.0 "))

    @inlineCallbacks
    def test_mailBeforeAuthCountsAsAnError(self) -> Any:
        """A client that only repeats MAIL without logging in is closed like one that sends
        nonsense (after 20 such replies)."""
        yield self.session.command("EHLO client.test")
        lines = yield self.session.send(f"MAIL FROM:{FROM}\r\n" * 21, replies=22)
        self.assertTrue(all(line.startswith("530 5.7.0 ") for line in lines[:20]), lines)
        self.assertReply(lines[-1], replies.TOO_MANY_ERRORS)
        self.assertTrue(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_mailBeforeAuthLearnsNothingElse(self) -> Any:
        """Before AUTH every MAIL gets the 530, whatever its parameters: not a 552 that tells
        the size limit, nor a 555 for a parameter."""
        yield self.session.command("EHLO client.test")
        for parameters in ("SIZE=999999999", "FOO=1", "SIZE=100 BODY=8BITMIME"):
            reply = yield self.session.command(f"MAIL FROM:{FROM} {parameters}")
            self.assertTrue(reply.startswith("530 5.7.0 "), (parameters, reply))

    @inlineCallbacks
    def test_dataBeforeRcpt(self) -> Any:
        yield self.session.login()
        self.assertReply((yield self.session.command("DATA")), replies.BAD_SEQUENCE)
        yield self.session.command(f"MAIL FROM:{FROM}")
        reply = yield self.session.command("DATA")
        self.assertTrue(reply.startswith("503 5.5.1 "))

    @inlineCallbacks
    def test_rcptBeforeMail(self) -> Any:
        yield self.session.login()
        reply = yield self.session.command("RCPT TO:<a@b.example>")
        self.assertTrue(reply.startswith("503 5.5.1 "))

    @inlineCallbacks
    def test_mailTwice(self) -> Any:
        yield self.session.login()
        self.assertReply((yield self.session.command(f"MAIL FROM:{FROM}")), replies.SENDER_OK)
        reply = yield self.session.command(f"MAIL FROM:{FROM}")
        self.assertTrue(reply.startswith("503 5.5.1 "))

    @inlineCallbacks
    def test_mailSyntax(self) -> Any:
        yield self.session.login()
        for bad in (
            "MAIL",
            "MAIL TO:<a@b>",
            "MAIL FROM:<a@b",
            "MAIL FROM:<a@b>x",
            "MAIL FROM:<a@b> =1",
        ):
            reply = yield self.session.command(bad)
            self.assertTrue(reply.startswith("501 5.5.4 "), (bad, reply))

    @inlineCallbacks
    def test_unknownMailParameter(self) -> Any:
        yield self.session.login()
        reply = yield self.session.command(f"MAIL FROM:{FROM} FOO=BAR")
        self.assertTrue(reply.startswith("555 5.5.4 "))

    @inlineCallbacks
    def test_unknownRcptParameter(self) -> Any:
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        reply = yield self.session.command("RCPT TO:<a@b.example> NOTIFY=NEVER")
        self.assertTrue(reply.startswith("555 5.5.4 "))

    @inlineCallbacks
    def test_knownMailParameters(self) -> Any:
        yield self.session.login()
        reply = yield self.session.command(f"MAIL FROM:{FROM} SIZE=100 BODY=8BITMIME SMTPUTF8")
        self.assertReply(reply, replies.SENDER_OK)

    @inlineCallbacks
    def test_declaredSizeTooBig(self) -> Any:
        yield self.session.login()
        reply = yield self.session.command(f"MAIL FROM:{FROM} SIZE=2001")
        self.assertTrue(reply.startswith("552 5.3.4 "))

    @inlineCallbacks
    def test_rsetEndsTransaction(self) -> Any:
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        self.assertReply((yield self.session.command("RSET")), replies.OK)
        self.assertReply((yield self.session.command(f"MAIL FROM:{FROM}")), replies.SENDER_OK)


class AuthTests(ProtocolTestCase):
    @inlineCallbacks
    def test_plainInitialResponse(self) -> Any:
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        self.assertTrue(reply.startswith("235 2.7.0 "))

    @inlineCallbacks
    def test_plainChallenge(self) -> Any:
        yield self.session.command("EHLO client.test")
        self.assertEqual((yield self.session.command("AUTH PLAIN")), "334 ")
        reply = yield self.session.command(plain(ACCOUNT, PASSWORD))
        self.assertReply(reply, replies.AUTH_OK)

    @inlineCallbacks
    def test_login(self) -> Any:
        yield self.session.command("EHLO client.test")
        self.assertEqual((yield self.session.command("AUTH LOGIN")), "334 VXNlcm5hbWU6")
        reply = yield self.session.command(base64.b64encode(ACCOUNT.encode()).decode())
        self.assertEqual(reply, "334 UGFzc3dvcmQ6")
        reply = yield self.session.command(base64.b64encode(PASSWORD.encode()).decode())
        self.assertReply(reply, replies.AUTH_OK)

    @inlineCallbacks
    def test_apiKey(self) -> Any:
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command(f"AUTH PLAIN {plain('App', self.harness.apiKey)}")
        self.assertReply(reply, replies.AUTH_OK)

    @inlineCallbacks
    def test_wrongPassword(self) -> Any:
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command(f"AUTH PLAIN {plain(ACCOUNT, 'wrong')}")
        self.assertTrue(reply.startswith("535 5.7.8 "))
        reply = yield self.session.command(f"AUTH PLAIN {plain('App', 'mr_bogus_key')}")
        self.assertTrue(reply.startswith("535 5.7.8 "))

    @inlineCallbacks
    def test_unknownUser(self) -> Any:
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command(f"AUTH PLAIN {plain('nobody', PASSWORD)}")
        self.assertReply(reply, replies.AUTH_FAILED)

    @inlineCallbacks
    def test_disabledAccount(self) -> Any:
        import dataclasses

        account = yield self.harness.store.getAccount(ACCOUNT)
        yield self.harness.store.updateAccount(dataclasses.replace(account, enabled=False))
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        self.assertReply(reply, replies.AUTH_FAILED)

    @inlineCallbacks
    def test_clientOutsideAccountNetworks(self) -> Any:
        import dataclasses

        account = yield self.harness.store.getAccount(ACCOUNT)
        yield self.harness.store.updateAccount(
            dataclasses.replace(account, networks=("198.51.100.0/24",))
        )
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        self.assertReply(reply, replies.AUTH_FAILED)
        inside = self.harness.connect(clientAddress="198.51.100.20")
        yield inside.login()

    @inlineCallbacks
    def test_tooManyFailuresClose(self) -> Any:
        yield self.session.command("EHLO client.test")
        bad = f"AUTH PLAIN {plain(ACCOUNT, 'wrong')}\r\n"
        lines = yield self.session.send(bad * 3, replies=3)
        self.assertReply(lines[0], replies.AUTH_FAILED)
        self.assertReply(lines[1], replies.AUTH_FAILED)
        self.assertTrue(lines[2].startswith("421 4.7.0 "))
        self.assertTrue(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_badBase64(self) -> Any:
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command("AUTH PLAIN !!!notbase64")
        self.assertTrue(reply.startswith("501 5.5.2 "))
        yield self.session.command("AUTH LOGIN")
        reply = yield self.session.command("%%%")
        self.assertTrue(reply.startswith("501 5.5.2 "))

    @inlineCallbacks
    def test_malformedPlain(self) -> Any:
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command("AUTH PLAIN " + base64.b64encode(b"just-one").decode())
        self.assertTrue(reply.startswith("501 5.5.2 "))

    @inlineCallbacks
    def test_cancel(self) -> Any:
        yield self.session.command("EHLO client.test")
        yield self.session.command("AUTH PLAIN")
        self.assertReply((yield self.session.command("*")), replies.AUTH_CANCELLED)

    @inlineCallbacks
    def test_unknownMechanism(self) -> Any:
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command("AUTH CRAM-MD5")
        self.assertTrue(reply.startswith("504 5.5.4 "))

    @inlineCallbacks
    def test_authTwice(self) -> Any:
        yield self.session.login()
        reply = yield self.session.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        self.assertReply(reply, replies.BAD_SEQUENCE)

    @inlineCallbacks
    def test_authBeforeEhlo(self) -> Any:
        reply = yield self.session.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        self.assertReply(reply, replies.BAD_SEQUENCE)

    @inlineCallbacks
    def test_throttledAddressIsRefused(self) -> Any:
        for _ in range(10):
            self.harness.throttle.failed("192.0.2.7")
        yield self.session.command("EHLO client.test")
        reply = yield self.session.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        self.assertTrue(reply.startswith("421 4.7.0 "))
        other = self.harness.connect(clientAddress="192.0.2.8")
        yield other.login()

    @inlineCallbacks
    def test_disabledAccountEndsOpenSessions(self) -> Any:
        """A client that stays connected does not keep sending for an account disabled since
        it logged in: within a second its next MAIL gets a 421 and the connection closes."""
        yield self.session.login()
        self.assertReply((yield self.session.command(f"MAIL FROM:{FROM}")), replies.SENDER_OK)
        yield self.session.command("RSET")
        account = yield self.harness.store.getAccount(ACCOUNT)
        yield self.harness.store.updateAccount(dataclasses.replace(account, enabled=False))
        self.harness.clock.advance(LOGIN_RECHECK_SECONDS)
        reply = yield self.session.command(f"MAIL FROM:{FROM}")
        self.assertReply(reply, replies.LOGIN_WITHDRAWN)
        self.assertTrue(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_successDoesNotClearFailures(self) -> Any:
        """A client with an account of its own cannot keep the count of failures from its
        address down by logging in as itself between guesses at another's password."""
        for guesses in range(1, 11):  # the harness's throttle allows 10 in 5 minutes
            session = self.harness.connect()
            yield session.command("EHLO client.test")
            reply = yield session.command(f"AUTH PLAIN {plain(ACCOUNT, 'guess')}")
            self.assertTrue(reply.startswith("535 5.7.8 "), reply)
            reply = yield session.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
            if guesses < 10:
                self.assertReply(reply, replies.AUTH_OK)
        self.assertTrue(reply.startswith("421 4.7.0 "), reply)


class EncryptionRequiredTests(ProtocolTestCase):
    def setUp(self) -> Any:
        d = super().setUp()
        d.addCallback(lambda _: self._connectStartTLS())
        return d

    def _connectStartTLS(self) -> None:
        self.session = self.harness.connect(
            security="starttls", allowPlaintextAuth=False, tlsContext=object()
        )

    @inlineCallbacks
    def test_authBeforeTLS(self) -> Any:
        lines = yield self.session.send("EHLO client.test\r\n")
        self.assertIn("250-STARTTLS", lines)
        self.assertFalse(any("AUTH" in line for line in lines))
        reply = yield self.session.command(f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}")
        self.assertTrue(reply.startswith("538 5.7.11 "))

    @inlineCallbacks
    def test_startTLSDiscardsPipelinedInput(self) -> Any:
        """RFC 3207 §4.2: nothing sent in the clear after STARTTLS is executed."""
        yield self.session.command("EHLO client.test")
        lines = yield self.session.send("STARTTLS\r\nNOOP\r\nNOOP\r\n")
        self.assertEqual(lines, ["220 2.0.0 Ready to start TLS"])
        self.assertIsNotNone(self.session.transport.tlsStarted)
        # The session starts over: EHLO needed again, and AUTH is offered now.
        self.assertReply((yield self.session.command(f"MAIL FROM:{FROM}")), replies.BAD_SEQUENCE)
        lines = yield self.session.send("EHLO client.test\r\n")
        self.assertIn("250-AUTH PLAIN LOGIN", lines)
        self.assertNotIn("250-STARTTLS", lines)

    @inlineCallbacks
    def test_startTLSTwice(self) -> Any:
        yield self.session.command("EHLO client.test")
        yield self.session.command("STARTTLS")
        reply = yield self.session.command("STARTTLS")
        self.assertReply(reply, replies.BAD_SEQUENCE)


class ReplyWriteTests(ProtocolTestCase):
    """The replies to pipelined commands leave in one write, and never after what must follow
    them on the wire (the TLS handshake, the close)."""

    def sent(self, data: bytes) -> list[bytes | str]:
        self.session.transport.events.clear()
        self.session.protocol.dataReceived(data)
        return self.session.transport.events

    def test_pipelinedRepliesInOneWrite(self) -> None:
        events = self.sent(b"EHLO client.test\r\nNOOP\r\nRSET\r\nNOOP\r\n")
        self.assertEqual(len(events), 1)
        assert isinstance(events[0], bytes)
        self.assertTrue(events[0].startswith(b"250-relay.test"))
        self.assertTrue(events[0].endswith(b"250 2.0.0 OK\r\n" * 3), events[0])

    def test_readyBeforeTheHandshake(self) -> None:
        self.session = self.harness.connect(security="starttls", tlsContext=object())
        events = self.sent(b"EHLO client.test\r\nNOOP\r\nSTARTTLS\r\nNOOP\r\n")
        self.assertEqual(events[-1], "startTLS")  # and the NOOP after it never answered
        self.assertEqual(len(events), 2)
        assert isinstance(events[0], bytes)
        self.assertTrue(events[0].endswith(b"250 2.0.0 OK\r\n220 2.0.0 Ready to start TLS\r\n"))

    def test_repliesBeforeTheClose(self) -> None:
        events = self.sent(b"NOOP\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(events[-1], "loseConnection")
        self.assertEqual(len(events), 2)
        assert isinstance(events[0], bytes)
        self.assertTrue(events[0].startswith(b"250 2.0.0 OK\r\n221 "), events[0])


class IdleMemoryTests(ProtocolTestCase):
    @inlineCallbacks
    def test_fewAttributes(self) -> Any:
        """
        CPython 3.11 keeps an instance's attributes in a key table shared by the class only up
        to a limit; past it, every instance carries a dict of its own. Measured with
        tracemalloc, a connection built by the listener's factory took 1.3 KB with 29
        attributes and 2.7 KB with 30 (and the 5,000 idle sessions of the benchmark 1.8 against
        2.9 KiB each). Keep the protocol's state at 29 or fewer.
        """
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        yield self.session.command("RCPT TO:<a@example.org>")
        yield self.session.command("DATA")
        yield self.session.send(HEADER + "Subject: hi\r\n\r\nbody\r\n.\r\n")
        # A listener's buildProtocol also sets ``factory``, which this harness does not.
        self.assertLessEqual(len(set(vars(self.session.protocol)) | {"factory"}), 29)


class TransactionTests(ProtocolTestCase):
    @inlineCallbacks
    def transaction(self, recipients: int = 1) -> Any:
        yield self.session.login()
        self.assertReply((yield self.session.command(f"MAIL FROM:{FROM}")), replies.SENDER_OK)
        for i in range(recipients):
            reply = yield self.session.command(f"RCPT TO:<user{i}@example.org>")
            self.assertReply(reply, replies.RECIPIENT_OK)
        self.assertTrue((yield self.session.command("DATA")).startswith("354 "))

    @inlineCallbacks
    def test_messageAccepted(self) -> Any:
        yield self.transaction(recipients=2)
        lines = yield self.session.send(HEADER + "Subject: hi\r\n\r\n..dotted\r\nbody\r\n.\r\n")
        match = _ACCEPTED.match(lines[-1])
        self.assertIsNotNone(match, lines)
        notificationId = match.group(1)
        notification = yield self.harness.store.getNotification(notificationId)
        self.assertEqual(notification.account, ACCOUNT)
        self.assertEqual(notification.sender, f"app@{SENDER_DOMAIN}")
        self.assertEqual(
            [r.address for r in notification.recipients], ["user0@example.org", "user1@example.org"]
        )
        trail = yield self.harness.store.statusTrail(notificationId)
        self.assertEqual([e.status_code for e in trail], ["CAAS_RECEIVED", "CAAS_RECEIVED"])
        self.assertEqual((yield self.queued()), 1)

    @inlineCallbacks
    def test_repeatedRecipientOnce(self) -> Any:
        """A recipient named twice (the same after normalising) is kept once, in the order of
        its first RCPT, and counts once toward the limit."""
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        for address in ("<a@example.org>", "<b@example.org>", "<a@EXAMPLE.org>", "<b@example.org>"):
            self.assertReply(
                (yield self.session.command(f"RCPT TO:{address}")), replies.RECIPIENT_OK
            )
        yield self.session.command("DATA")
        lines = yield self.session.send(HEADER + "Subject: hi\r\n\r\nbody\r\n.\r\n")
        match = _ACCEPTED.match(lines[-1])
        self.assertIsNotNone(match, lines)
        notification = yield self.harness.store.getNotification(match.group(1))
        self.assertEqual(
            [r.address for r in notification.recipients], ["a@example.org", "b@example.org"]
        )

    @inlineCallbacks
    def test_secondMessageOnSameConnection(self) -> Any:
        yield self.transaction()
        yield self.session.send(HEADER + "Subject: one\r\n\r\nx\r\n.\r\n")
        self.assertReply((yield self.session.command(f"MAIL FROM:{FROM}")), replies.SENDER_OK)

    @inlineCallbacks
    def test_senderNotRegistered(self) -> Any:
        yield self.session.login()
        reply = yield self.session.command("MAIL FROM:<app@elsewhere.example>")
        self.assertTrue(reply.startswith("553 5.7.1 "))

    @inlineCallbacks
    def test_recipientSyntax(self) -> Any:
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        reply = yield self.session.command("RCPT TO:<not an address>")
        self.assertTrue(reply.startswith("553 5.1.3 ") or reply.startswith("501 5.5.4 "), reply)
        reply = yield self.session.command("RCPT TO:<nobody>")
        self.assertTrue(reply.startswith("553 5.1.3 "), reply)

    @inlineCallbacks
    def test_noValidRecipients(self) -> Any:
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        yield self.session.command("RCPT TO:<nobody>")
        reply = yield self.session.command("DATA")
        self.assertReply(reply, replies.NO_VALID_RECIPIENTS)

    @inlineCallbacks
    def test_tooManyRecipients(self) -> Any:
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        pipeline = "".join(f"RCPT TO:<u{i}@example.org>\r\n" for i in range(61))
        lines = yield self.session.send(pipeline, replies=61)
        self.assertEqual(len(lines), 61)
        for line in lines[:60]:
            self.assertReply(line, replies.RECIPIENT_OK)
        self.assertTrue(lines[60].startswith("452 4.5.3 "))

    @inlineCallbacks
    def test_actualSizeTooBig(self) -> Any:
        yield self.transaction()
        lines = yield self.session.send(
            HEADER + "Subject: big\r\n\r\n" + ("x" * 70 + "\r\n") * 40 + ".\r\n"
        )
        self.assertTrue(lines[-1].startswith("552 5.3.4 "))
        self.assertEqual((yield self.queued()), 0)

    @inlineCallbacks
    def test_bareLineFeedRefused(self) -> Any:
        yield self.transaction()
        lines = yield self.session.send(HEADER + "Subject: x\r\n\r\nline\n.\nstill data\r\n.\r\n")
        self.assertTrue(lines[-1].startswith("550 5.6.0 "), lines)
        self.assertEqual((yield self.queued()), 0)

    @inlineCallbacks
    def test_longLineInDataDiscardsMessage(self) -> Any:
        """The rest of the message is read and thrown away: QUIT inside it does not run."""
        yield self.transaction()
        body = "Subject: x\r\n\r\n" + "y" * 1200 + "\r\nQUIT\r\n.\r\n"
        lines = yield self.session.send(body)
        self.assertTrue(lines[-1].startswith("500 5.5.2 "), lines)
        self.assertFalse(self.session.transport.disconnecting)
        self.assertEqual((yield self.queued()), 0)
        self.assertReply((yield self.session.command("NOOP")), replies.OK)

    @inlineCallbacks
    def test_storeUnavailable(self) -> Any:
        """Nothing half-accepted: a store failure answers 451 4.3.0 so the client retries."""
        yield self.transaction()
        yield self.harness.store.close()
        lines = yield self.session.send(HEADER + "Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertTrue(lines[-1].startswith("451 4.3.0 "), lines)
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_pipelinedTransaction(self) -> Any:
        """50 RCPTs behind a MAIL whose check is asynchronous: replies in order, no 503."""
        yield self.session.login()
        pipeline = f"MAIL FROM:{FROM}\r\n"
        pipeline += "".join(f"RCPT TO:<user{i}@example.org>\r\n" for i in range(50))
        pipeline += "DATA\r\n"
        lines = yield self.session.send(pipeline, replies=52)
        self.assertReply(lines[0], replies.SENDER_OK)
        for line in lines[1:51]:
            self.assertReply(line, replies.RECIPIENT_OK)
        self.assertTrue(lines[51].startswith("354 "))
        lines = yield self.session.send(
            HEADER + "Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n", replies=2
        )
        self.assertIsNotNone(_ACCEPTED.match(lines[0]), lines)
        self.assertReply(lines[1], replies.OK)

    @inlineCallbacks
    def test_pipelinedWholeSession(self) -> Any:
        """A client that pipelines everything up to DATA and then the message and QUIT."""
        yield self.session.command("EHLO client.test")
        pipeline = (
            f"AUTH PLAIN {plain(ACCOUNT, PASSWORD)}\r\nMAIL FROM:{FROM}\r\n"
            "RCPT TO:<a@example.org>\r\nRCPT TO:<bad>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        )
        lines = yield self.session.send(pipeline, replies=6)
        self.assertReply(lines[0], replies.AUTH_OK)
        self.assertReply(lines[1], replies.SENDER_OK)
        self.assertReply(lines[2], replies.RECIPIENT_OK)
        self.assertTrue(lines[3].startswith("553 5.1.3 "))
        self.assertReply(lines[4], replies.RECIPIENT_OK)
        self.assertTrue(lines[5].startswith("354 "))
        lines = yield self.session.send(
            HEADER + "Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n", replies=2
        )
        self.assertIsNotNone(_ACCEPTED.match(lines[0]))
        self.assertReply(lines[1], replies.BYE)


class TimeoutTests(ProtocolTestCase):
    @inlineCallbacks
    def test_idleTimeout(self) -> Any:
        yield self.session.login()
        self.harness.clock.advance(299)
        self.assertFalse(self.session.transport.disconnecting)
        self.harness.clock.advance(2)
        lines = self.session.take()
        self.assertTrue(lines[-1].startswith("421 4.4.2 "), lines)
        self.assertTrue(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_activityResetsTimeout(self) -> Any:
        yield self.session.login()
        self.harness.clock.advance(200)
        yield self.session.command("NOOP")
        self.harness.clock.advance(200)
        self.assertFalse(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_noLoginInTime(self) -> Any:
        """Where AUTH is required, a client that keeps its session alive (a NOOP now and then)
        but never logs in holds a connection slot for command_timeout at most."""
        self.harness.clock.advance(200)
        self.assertReply((yield self.session.command("NOOP")), replies.OK)
        self.harness.clock.advance(99)
        self.assertFalse(self.session.transport.disconnecting)
        self.harness.clock.advance(1)
        self.assertReply(self.session.take()[-1], replies.NO_LOGIN_IN_TIME)
        self.assertTrue(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_loggedInSessionHasNoLoginDeadline(self) -> Any:
        yield self.session.login()
        self.harness.clock.advance(200)
        self.assertReply((yield self.session.command("NOOP")), replies.OK)
        self.harness.clock.advance(200)
        self.assertFalse(self.session.transport.disconnecting)
        self.assertEqual(self.session.take(), [])

    @inlineCallbacks
    def test_dataTimeout(self) -> Any:
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        yield self.session.command("RCPT TO:<a@example.org>")
        yield self.session.command("DATA")
        self.harness.clock.advance(301)
        self.assertFalse(self.session.transport.disconnecting)  # data_timeout is 600
        self.harness.clock.advance(300)
        self.assertTrue(self.session.take()[-1].startswith("421 4.4.2 "))

    @inlineCallbacks
    def test_noTimeoutWhileTheRelayDecides(self) -> Any:
        """
        The idle timeout is the client's: while the relay itself takes its time over a message
        (here the store holds the enqueue, as a database whose write lock another connection
        holds makes the commit wait) it does not run. Otherwise the client would get a 421 for
        a message the store then keeps, and send it again. Once the message is answered the
        timeout runs again.
        """
        yield self.session.login()
        yield self.session.command(f"MAIL FROM:{FROM}")
        yield self.session.command("RCPT TO:<a@example.org>")
        yield self.session.command("DATA")
        self.harness.store.holdEnqueues()
        self.session.protocol.dataReceived((HEADER + "\r\nbody\r\n.\r\n").encode())
        self.harness.clock.advance(301)  # command_timeout is 300
        self.assertFalse(self.session.transport.disconnecting)
        self.assertEqual(self.session.take(), [])
        self.harness.store.releaseEnqueues()
        lines = yield self.session.send(b"", replies=1)
        self.assertIsNotNone(_ACCEPTED.match(lines[0]), lines)
        self.assertEqual((yield self.queued()), 1)
        self.harness.clock.advance(299)
        self.assertFalse(self.session.transport.disconnecting)
        self.harness.clock.advance(2)
        self.assertTrue(self.session.take()[-1].startswith("421 4.4.2 "))


class RelayByNetworkTests(ProtocolTestCase):
    @inlineCallbacks
    def test_networkAccountSubmitsWithoutAuth(self) -> Any:
        import dataclasses

        account = yield self.harness.store.getAccount(ACCOUNT)
        yield self.harness.store.updateAccount(
            dataclasses.replace(account, networks=("192.0.2.0/24",))
        )
        session = self.harness.connect(clientAddress="192.0.2.50", authMode="network")
        yield session.command("EHLO erp.test")
        self.assertReply((yield session.command(f"MAIL FROM:{FROM}")), replies.SENDER_OK)
        outsider = self.harness.connect(clientAddress="203.0.113.9", authMode="network")
        yield outsider.command("EHLO erp.test")
        reply = yield outsider.command(f"MAIL FROM:{FROM}")
        self.assertTrue(reply.startswith("530 5.7.0 "))


class StoreNotReadyTests(ProtocolTestCase):
    """Just after start, sessions wait for the store before greeting (no 451s meanwhile)."""

    @inlineCallbacks
    def test_greetingWaitsForTheStore(self) -> Any:
        from twisted.internet.defer import Deferred

        ready: Deferred[None] = Deferred()
        session = self.harness.connect(whenReady=lambda: ready)
        self.assertEqual(session.greeting, [])
        session.protocol.dataReceived(b"EHLO client.test\r\nNOOP\r\n")
        self.assertEqual(session.take(), [])  # nothing answered before the greeting
        ready.callback(None)
        lines = yield session.send(b"", replies=3)
        self.assertEqual(lines[0], "220 relay.test ESMTP")
        self.assertTrue(lines[1].startswith("250-relay.test greets client.test"))
        self.assertReply(lines[-1], replies.OK)


class ConnectionLimitTests(ProtocolTestCase):
    """limits.max_connections and max_connections_per_client: 421 4.7.0, then close."""

    def test_limits(self) -> None:
        from twisted.python.failure import Failure

        from mailrelay.smtp.listener import ConnectionCounter

        counter = ConnectionCounter(maxTotal=2, maxPerClient=1)
        first = self.harness.connect(clientAddress="192.0.2.1", connections=counter)
        self.assertEqual(first.greeting, ["220 relay.test ESMTP"])
        again = self.harness.connect(clientAddress="192.0.2.1", connections=counter)
        self.assertTrue(again.greeting[0].startswith("421 4.7.0 "))
        self.assertTrue(again.transport.disconnecting)
        again.protocol.connectionLost(Failure(ConnectionError()))
        other = self.harness.connect(clientAddress="192.0.2.2", connections=counter)
        self.assertEqual(other.greeting, ["220 relay.test ESMTP"])
        third = self.harness.connect(clientAddress="192.0.2.3", connections=counter)
        self.assertReply(third.greeting[0], replies.TOO_MANY_CONNECTIONS)
        third.protocol.connectionLost(Failure(ConnectionError()))
        self.assertEqual(counter.total, 2)
        first.protocol.connectionLost(Failure(ConnectionError()))
        self.assertEqual(counter.total, 1)
        back = self.harness.connect(clientAddress="192.0.2.1", connections=counter)
        self.assertEqual(back.greeting, ["220 relay.test ESMTP"])


class ChunkingTests(ProtocolTestCase):
    """BDAT (RFC 3030): exact byte counts, no dot-stuffing, refused chunks still read."""

    MESSAGE = HEADER.encode() + b"Subject: chunked\r\n\r\n.leading dot stays\r\nbody\r\n"

    @inlineCallbacks
    def begin(self) -> Any:
        yield self.session.login()
        self.assertReply((yield self.session.command(f"MAIL FROM:{FROM}")), replies.SENDER_OK)
        reply = yield self.session.command("RCPT TO:<a@example.org>")
        self.assertReply(reply, replies.RECIPIENT_OK)

    @inlineCallbacks
    def storedMessage(self, reply: str) -> Any:
        match = _ACCEPTED.match(reply)
        self.assertIsNotNone(match, reply)
        assert match is not None
        entries = yield self.harness.store.claimDue(10, 60)
        [entry] = [e for e in entries if e.notification.notification_id == match.group(1)]
        return entry.message

    @inlineCallbacks
    def test_advertised(self) -> Any:
        lines = yield self.session.send("EHLO client.test\r\n")
        self.assertIn("250-CHUNKING", lines)

    @inlineCallbacks
    def test_oneChunk(self) -> Any:
        yield self.begin()
        lines = yield self.session.send(b"BDAT %d LAST\r\n" % len(self.MESSAGE) + self.MESSAGE)
        stored = yield self.storedMessage(lines[-1])
        self.assertTrue(stored.endswith(self.MESSAGE.split(b"\r\n\r\n", 1)[1]))
        self.assertIn(b"\r\n.leading dot stays\r\n", stored)  # no dot-stuffing with BDAT

    @inlineCallbacks
    def test_pipelinedChunksAcrossReads(self) -> Any:
        yield self.begin()
        first, second = self.MESSAGE[:30], self.MESSAGE[30:]
        wire = b"BDAT 30\r\n" + first + b"BDAT %d LAST\r\n" % len(second) + second + b"NOOP\r\n"
        for i in range(0, len(wire), 7):  # arrives in small pieces
            self.session.protocol.dataReceived(wire[i : i + 7])
        lines = yield self.session.send(b"", replies=3)
        self.assertEqual(lines[0], "250 2.0.0 30 octets received")
        stored = yield self.storedMessage(lines[1])
        self.assertIn(b"Subject: chunked", stored)
        self.assertReply(lines[2], replies.OK)

    @inlineCallbacks
    def test_refusedChunkIsReadNotExecuted(self) -> Any:
        yield self.session.login()
        lines = yield self.session.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n", replies=2)
        self.assertReply(lines[0], replies.BAD_SEQUENCE)
        self.assertReply(lines[1], replies.OK)
        self.assertFalse(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_hugeSizeIsASyntaxError(self) -> Any:
        """A size of thousands of digits is a 501, not an int() error that drops the
        connection with a traceback in the log (Python refuses to convert over 4,300)."""
        lines = yield self.session.send(b"BDAT " + b"9" * 5000 + b" LAST\r\nNOOP\r\n", 2)
        self.assertTrue(lines[0].startswith("501 5.5.4 Syntax: BDAT"), lines)
        self.assertReply(lines[1], replies.OK)
        self.assertFalse(self.session.transport.disconnecting)

    @inlineCallbacks
    def test_tooBig(self) -> Any:
        yield self.begin()
        lines = yield self.session.send(b"BDAT 2001 LAST\r\n" + b"x" * 2001 + b"NOOP\r\n", 2)
        self.assertTrue(lines[0].startswith("552 5.3.4 "))
        self.assertReply(lines[1], replies.OK)
        self.assertEqual((yield self.queued()), 0)

    @inlineCallbacks
    def test_bareLineFeedRefused(self) -> Any:
        yield self.begin()
        message = HEADER.encode() + b"\r\nline\nmore\r\n"
        lines = yield self.session.send(b"BDAT %d LAST\r\n" % len(message) + message)
        self.assertTrue(lines[-1].startswith("550 5.6.0 "), lines)
        self.assertEqual((yield self.queued()), 0)

    @inlineCallbacks
    def test_dataAfterBdat(self) -> Any:
        yield self.begin()
        yield self.session.send(b"BDAT 5\r\nFrom:")
        self.assertReply((yield self.session.command("DATA")), replies.BAD_SEQUENCE)

    @inlineCallbacks
    def test_syntax(self) -> Any:
        yield self.begin()
        for bad in ("BDAT", "BDAT x", "BDAT 5 FIRST", "BDAT -1"):
            self.assertReply((yield self.session.command(bad)), replies.SYNTAX_ERROR)


class LargeChunkTests(ProtocolTestCase):
    """BDAT of messages larger than what is kept in memory."""

    limits: dict[str, Any] = {"max_message_size": 10 * 1024 * 1024, "max_recipients": 60}

    @inlineCallbacks
    def test_largeChunksWaitOnDisk(self) -> Any:
        """Chunks past SPOOL_IN_MEMORY wait in a file, as a large DATA does: a session
        sending a message just under the size limit in BDAT chunks does not hold it in
        memory (SECURITY.md: 8 such sessions took 150 MiB before)."""
        from mailrelay.smtp.data import SPOOL_IN_MEMORY

        yield ChunkingTests.begin(self)  # type: ignore[arg-type]
        line = b"x" * 78 + b"\r\n"
        chunk = HEADER.encode() + b"\r\n" + line * (2 * SPOOL_IN_MEMORY // len(line))
        lines = yield self.session.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        self.assertEqual(lines[-1], f"250 2.0.0 {len(chunk)} octets received")
        transaction = self.session.protocol._transaction
        self.assertTrue(transaction.chunks.onDisk)
        lines = yield self.session.send(b"BDAT 5 LAST\r\nend\r\n")
        stored = yield ChunkingTests.storedMessage(self, lines[-1])  # type: ignore[arg-type]
        self.assertTrue(stored.endswith(line * 100 + b"end\r\n"))


class ClientTextInRepliesTests(ProtocolTestCase):
    """Client input never puts control characters into a reply."""

    @inlineCallbacks
    def test_ehloWithControlCharacters(self) -> Any:
        reply = yield self.session.command("EHLO evil\x1b[31m.example")
        self.assertReply(reply, replies.SYNTAX_ERROR)

    def test_replyTextIsNeutralised(self) -> None:
        reply = replies.SYNTAX_ERROR.withText("bad \x1b[2J\rinjected\x00")
        self.assertEqual(reply.toBytes(), b"501 5.5.4 bad ?[2J?injected?\r\n")


class RealSocketTests(TestCase):
    """What only a real TCP connection shows."""

    async def test_repliesAreNotHeldBackByNagle(self) -> None:
        """The session's socket has TCP_NODELAY: a reply written after an asynchronous check
        (the first MAIL of a client whose account is not remembered) goes out at once instead
        of waiting behind the unacknowledged previous reply for the client's delayed ACK."""
        harness = MemoryProtocolHarness(self)
        await harness.start()
        factory = SubmissionFactory(harness.settings())
        built: list[Any] = []

        class Recording(ServerFactory):
            def buildProtocol(self, addr: Any) -> Any:
                protocol = factory.buildProtocol(addr)
                built.append(protocol)
                return protocol

        port = reactor.listenTCP(0, Recording(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        client = socket.create_connection(("127.0.0.1", port.getHost().port), 5)
        self.addCleanup(client.close)
        self.assertTrue((await deferToThread(client.recv, 100)).startswith(b"220 "))
        (protocol,) = built
        handle = protocol.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
