"""
The ESMTP server protocol: it speaks the wire; the avatar (``ISubmission``) decides.

Commands are taken one at a time from the input buffer. A command whose decision is a Deferred
(MAIL, RCPT, AUTH, end of DATA) holds the commands pipelined behind it until it has been
answered, so replies always leave in order and a RCPT never sees a MAIL that is still being
checked. The DATA section is read in bulk by :class:`mailrelay.smtp.data.DataReader`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay import maillog, metrics
from mailrelay.auth.credentials import credentialsFor
from mailrelay.interfaces import ISubmission, StoreError
from mailrelay.model import API_KEY_USER, Recipient, SessionInfo
from mailrelay.numbers import isDecimal
from mailrelay.policy.decisions import Refusal
from mailrelay.sendnow import writeNow
from mailrelay.smtp import replies
from mailrelay.smtp.arguments import mailOptions, parsePathArgument
from mailrelay.smtp.data import DataReader, Spool, lineProblem
from mailrelay.smtp.refusals import replyFor
from mailrelay.smtp.replies import Reply
from mailrelay.smtp.settings import ListenerSettings
from mailrelay.smtp.storehealth import storeHealth

# RFC 5321 allows 512 octets for a command line; AUTH responses may be up to 12288 (RFC 4954).
MAX_COMMAND_LINE = 12288
# Input held while a command is being decided before we stop reading from the client.
MAX_PENDING_INPUT = 256 * 1024
MAX_BAD_COMMANDS = 20
_HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "DELETE"})
# Replies that mean the client does not speak SMTP properly (not policy refusals): too many of
# them on one connection and it is closed.
_PROTOCOL_ERRORS = frozenset({500, 501, 502, 503, 504, 530, 555})
# Seconds a connection being closed politely (a reply, then loseConnection) may take to go:
# a client that stops reading keeps the reply unsent, a TLS close waits for a handshake, and
# either would hold the slot for ever. Then it is aborted.
CLOSE_GRACE = 10.0
# _tlsVersion while a TLS handshake is under way (the TLS layer holds all input meanwhile).
_HANDSHAKING = "handshaking"

CommandResult = Reply | Deferred[Reply] | None
# A HELO/EHLO argument: a domain or address literal, no white space or control characters
# (lenient beyond that: clients send all sorts of names, and the name decides nothing).
_HELO_NAME = re.compile(r"[^\x00-\x20\x7f]{1,255}")


def _isHeloName(argument: str) -> bool:
    return _HELO_NAME.fullmatch(argument) is not None


def _throttledAccount(user: str) -> str | None:
    """The account a login names, for the per-account throttle; None for API-key logins
    (``App``: a 256-bit key is not guessed, and one name shared by every key holder would let
    a guesser lock all of them out)."""
    return None if user == API_KEY_USER else user


def _acceptedReply(notificationId: str) -> Reply:
    return replies.ACCEPTED.withText(f"OK id={notificationId}")


@dataclass
class Transaction:
    """One mail transaction: from MAIL to the end of DATA (or RSET)."""

    sender: Any  # what the avatar's validateFrom returned; handed back to it
    smtputf8: bool = False
    recipients: list[Recipient] = field(default_factory=list)
    # The same, to tell a repeated RCPT at once: with 50 recipients, looking through the list
    # compared dataclasses ~1,200 times per message (150 us).
    recipientSet: set[Recipient] = field(default_factory=set)
    rcptAttempts: int = 0
    chunks: Spool | None = None  # BDAT chunks so far (None: no BDAT yet)
    chunkedSize: int = 0


@dataclass
class Chunk:
    """A BDAT chunk being read: its bytes are read (and kept or thrown away) before replying."""

    remaining: int
    size: int
    last: bool
    refusal: Reply | None


@implementer(IHandshakeListener)
class SubmissionProtocol(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self, settings: ListenerSettings, implicitTLS: bool = False) -> None:
        self.settings = settings
        self._tls = implicitTLS
        self._tlsVersion: str | None = None
        self._buffer = b""
        self._pos = 0
        self._discardingLine = False
        # While the input is being processed: the replies written meanwhile, sent together when
        # it is. (One attribute, not a flag and a list: past 30 attributes CPython gives an
        # instance a dict of its own, 1.1 KiB more for every idle connection.)
        self._processing: list[bytes] | None = None
        self._blocked = False
        self._paused = False
        self._closing = False
        self._helo: str | None = None
        self._esmtp = False
        self._avatar: Any = None
        self._authenticated = False
        self._logout: Callable[[], None] | None = None
        self._authFailures = 0
        self._badCommands = 0
        self._transaction: Transaction | None = None
        self._reader: DataReader | None = None
        self._chunk: Chunk | None = None
        self._lineHandler: Callable[[bytes], CommandResult] | None = None
        self._clientAddress = ""
        self._sessionInfo: SessionInfo | None = None
        self._counted = False  # whether settings.connections counts this connection

    def callLater(self, period: float, func: Callable[[], object]) -> Any:
        """TimeoutMixin's clock: the listener's (a task.Clock in tests)."""
        return self.settings.clock.callLater(period, func)

    # -- connection ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self._clientAddress = getattr(peer, "host", "") or ""
        metrics.connections.labels(self.settings.name).inc()
        metrics.sessions.labels(self.settings.name).inc()
        self.setTimeout(self.settings.limits.command_timeout)
        if self._tls:
            # Implicit TLS: the handshake comes first, and the greeting waits in the TLS layer
            # for it. The idle timeout's polite close would wait for it too (for ever).
            self._startHandshakeDeadline()
        # Replies go out whole (one write per reactor turn), so Nagle's algorithm would only
        # hold back a reply written after an asynchronous check -- until the client's delayed
        # ACK, some 40 ms later.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        counter = self.settings.connections
        if counter is not None:
            if not counter.acquire(self._clientAddress):
                self._closeWith(replies.TOO_MANY_CONNECTIONS)
                return
            self._counted = True
        sessions = self.settings.sessions
        if sessions is not None:
            sessions.add(self)
            if sessions.draining:
                self._closeWith(replies.SHUTTING_DOWN)
                return
        # A throttled address is refused at AUTH, not here: a relay-by-IP client behind the
        # same NAT address as a password guesser must still get through.
        whenReady = self.settings.whenReady
        if whenReady is None:
            self._greet()
            return
        # Just after start the store may still be opening: the client waits for the greeting
        # (commands sent meanwhile wait too) rather than meeting 451s.
        self._blocked = True
        d = whenReady()
        d.addCallback(lambda _: self._greet())

    def _greet(self) -> None:
        if self._closing:
            return
        if self._isDraining():
            self._closeWith(replies.SHUTTING_DOWN)
            return
        self._write(f"220 {self.settings.hostname} ESMTP\r\n".encode())
        if self._blocked:
            self._answerLater(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self._closing = True
        metrics.sessions.labels(self.settings.name).dec()
        if self._counted:
            self._counted = False
            assert self.settings.connections is not None
            self.settings.connections.release(self._clientAddress)
        if self.settings.sessions is not None:
            self.settings.sessions.discard(self)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._logoutAvatar()

    # -- hard deadlines --------------------------------------------------------------------

    # The idle timer (TimeoutMixin's) is also the hard deadline of the phases in which the
    # client's bytes do not reach dataReceived, so cannot reset it: a TLS handshake (the TLS
    # layer consumes them) and a polite close (they are ignored).

    def _startHandshakeDeadline(self) -> None:
        self._tlsVersion = _HANDSHAKING
        self.setTimeout(self.settings.limits.tls_handshake_timeout)

    def handshakeCompleted(self) -> None:
        """The TLS layer's news that the handshake is done (IHandshakeListener)."""
        if self._tlsVersion is _HANDSHAKING:
            self._tlsVersion = None  # read from the connection when first needed
        if not self._closing:
            self.setTimeout(self.settings.limits.command_timeout)

    def _abort(self) -> None:
        self._closing = True
        self._buffer, self._pos = b"", 0
        self.transport.abortConnection()  # type: ignore[union-attr]

    def timeoutConnection(self) -> None:
        if self._closing:
            # The polite close did not finish in CLOSE_GRACE (the client does not read).
            self._abort()
            return
        if self._tlsVersion is _HANDSHAKING:
            # Nothing can be said to a client that has not finished its handshake, and a
            # polite close would wait for the handshake: abort.
            self.log.info(
                "{client} did not complete a TLS handshake in time", client=self._clientAddress
            )
            self._abort()
            return
        if self._blocked:
            # The idle timeout is the client's: while the relay decides (a store slow to
            # commit, say) the client is waiting, not idle, and a 421 now would be followed by
            # the store keeping the message, which the client would then send again. The
            # stores bound their own waits and answer 451. (The timer is spent: start anew.)
            self.setTimeout(self.timeOut)
            return
        if self._mustLogIn():
            self.log.info("{client} did not authenticate in time", client=self._clientAddress)
            self._closeWith(replies.NO_LOGIN_IN_TIME)
            return
        self.log.info("{client} timed out", client=self._clientAddress)
        self._closeWith(replies.TIMEOUT)

    def _mustLogIn(self) -> bool:
        """Whether this client has yet to log in where AUTH is required. Until it has, its
        commands do not reset the timeout: command_timeout counts from the connection (or the
        last login attempt), so a client cannot hold a connection slot for ever with a NOOP
        now and then without ever logging in."""
        return not self._authenticated and self.settings.authMode == "required"

    def _write(self, data: bytes) -> None:
        # The replies to pipelined commands go out in one write when the input has been
        # processed: 52 writes for a message to 50 recipients cost Twisted's bookkeeping 52
        # times over, for what reaches the socket in one send either way.
        if self._processing is not None:
            self._processing.append(data)
        else:
            writeNow(self.transport, data)

    def _flushReplies(self) -> None:
        """Write what the commands processed so far answered (before TLS starts, before the
        connection is closed, and once the input is processed)."""
        if self._processing:
            data = b"".join(self._processing)
            self._processing.clear()
            writeNow(self.transport, data)

    def _reply(self, reply: Reply) -> None:
        if reply.code == 421:  # RFC 5321 §3.8: the server closes the connection after it
            if not self._closing:
                self._closeWith(reply)
            return
        if reply.code in _PROTOCOL_ERRORS:
            self._badCommands += 1
        self._write(reply.wire)
        if self._badCommands > MAX_BAD_COMMANDS and not self._closing:
            self._closeWith(replies.TOO_MANY_ERRORS)

    def _closeWith(self, reply: Reply) -> None:
        self._write(reply.wire)
        self._flushReplies()
        self._closing = True
        self._buffer = b""
        self._pos = 0
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.setTimeout(CLOSE_GRACE)

    # -- input -----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._mustLogIn():
            self.resetTimeout()
        if self._reader is not None and not self._blocked and self._processing is None:
            self._feedData(data)
        else:
            self._buffer += data
        self._processBuffer()

    def _processBuffer(self) -> None:
        if self._processing is not None:
            return
        self._processing = []
        try:
            while not self._blocked and not self._closing:
                if self._chunk is not None:
                    if not self._takeChunk():
                        break
                    continue
                if self._reader is not None:
                    if self._pos >= len(self._buffer):
                        break
                    data = self._buffer[self._pos :]
                    self._buffer, self._pos = b"", 0
                    self._feedData(data)
                    continue
                line = self._nextLine()
                if line is None:
                    break
                self._run(self._handleLine(line))
        finally:
            self._flushReplies()
            self._processing = None
        self._flowControl()
        if self._isDraining() and self._idle():
            self._closeWith(replies.SHUTTING_DOWN)

    # -- drain (SIGTERM; mailrelay.smtp.sessions) ------------------------------------------

    def _isDraining(self) -> bool:
        sessions = self.settings.sessions
        return sessions is not None and sessions.draining

    def _idle(self) -> bool:
        """Nothing under way that closing now would lose: no command being decided, no
        message being read (DATA or a BDAT chunk, or between the chunks of one)."""
        transaction = self._transaction
        return not (
            self._closing
            or self._blocked
            or self._reader is not None
            or self._chunk is not None
            or self._processing is not None
            or (transaction is not None and transaction.chunks is not None)
        )

    def drain(self) -> None:
        """The relay is stopping: close now (421 4.3.2) if nothing is under way; else the
        message or decision under way finishes and is answered, then the session closes."""
        if self._idle():
            self._closeWith(replies.SHUTTING_DOWN)

    def abortForShutdown(self) -> None:
        """The drain's deadline has passed: 421 4.3.2 and close, whatever is under way."""
        if self._closing:
            self._abort()
        else:
            self._closeWith(replies.SHUTTING_DOWN)

    def _flowControl(self) -> None:
        pending = len(self._buffer) - self._pos
        if not self._paused and pending > MAX_PENDING_INPUT:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
        elif self._paused and pending <= MAX_PENDING_INPUT:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _nextLine(self) -> bytes | None:
        """The next complete command line without its line ending, or None for "need more"."""
        while True:
            end = self._buffer.find(b"\n", self._pos)
            if end < 0:
                if self._pos:
                    self._buffer, self._pos = self._buffer[self._pos :], 0
                if len(self._buffer) > MAX_COMMAND_LINE:
                    self._buffer = b""
                    if not self._discardingLine:
                        self._discardingLine = True
                        self._reply(replies.LINE_TOO_LONG)
                return None
            line = self._buffer[self._pos : end]
            self._pos = end + 1
            if self._discardingLine:
                self._discardingLine = False
                continue
            if len(line) > MAX_COMMAND_LINE:
                self._reply(replies.LINE_TOO_LONG)
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            return line

    def _run(self, result: CommandResult) -> None:
        """Answer a command now, or hold the input until its Deferred answers it."""
        if isinstance(result, Deferred):
            self._blocked = True
            result.addErrback(self._replyForFailure)
            result.addCallback(self._answerLater)
        elif result is not None:
            self._reply(result)

    def _answerLater(self, reply: Reply | None) -> None:
        self._blocked = False
        if self._closing:
            return
        if not self._mustLogIn():
            self.resetTimeout()  # the client's idle time starts with the answer
        if reply is not None:
            self._reply(reply)
        self._processBuffer()

    def _decide(
        self, check: Callable[[], Any], then: Callable[[Any], Reply]
    ) -> Reply | Deferred[Reply]:
        """
        Run one of the avatar's checks and answer with ``then(its result)``: at once when the
        check answers at once (the common case, without a Deferred), later when it returns a
        Deferred. A refusal becomes its reply, anything else unexpected a 451.
        """
        try:
            result = check()
        except Exception:
            return self._replyForFailure(Failure())
        if isinstance(result, Deferred):
            return result.addCallback(then)
        return then(result)

    def _replyForFailure(self, failure: Failure) -> Reply:
        if isinstance(failure.value, Refusal):  # policy's no, in SMTP words
            return replyFor(failure.value)
        if failure.check(replies.Refused):
            return failure.value.reply  # type: ignore[union-attr]
        if failure.check(StoreError):
            storeHealth.failed(failure)
            return replies.TEMPORARY_FAILURE
        self.log.failure("internal error answering {client}", failure, client=self._clientAddress)
        return replies.TEMPORARY_FAILURE

    def _handleLine(self, line: bytes) -> CommandResult:
        if self._isDraining():
            # A new command gets 421; the BDATs of a message begun before the drain go on.
            transaction = self._transaction
            if transaction is None or transaction.chunks is None:
                self._closeWith(replies.SHUTTING_DOWN)
                return None
        if self._lineHandler is not None:
            handler, self._lineHandler = self._lineHandler, None
            return handler(line)
        verb, _, rawArgument = line.partition(b" ")
        try:
            command = verb.decode("ascii").upper()
            argument = rawArgument.decode("utf-8").strip()
        except UnicodeDecodeError:
            return replies.SYNTAX_ERROR.withText("Invalid characters in command")
        method = getattr(self, f"smtp_{command}", None)
        if method is None:
            if command in _HTTP_VERBS:
                self._closeWith(replies.UNKNOWN_COMMAND.withText("This is an SMTP server"))
                return None
            return replies.UNKNOWN_COMMAND
        return method(argument)

    # -- session state ---------------------------------------------------------------------

    def _session(self) -> SessionInfo:
        """What the avatar may know of this session; made again only when any of it changed."""
        tlsVersion = self._currentTLSVersion()
        session = self._sessionInfo
        if (
            session is None
            or session.helo != (self._helo or "")
            or session.tls_version != tlsVersion
            or session.authenticated != self._authenticated
        ):
            session = self._sessionInfo = SessionInfo(
                client_address=self._clientAddress,
                listener=self.settings.name,
                helo=self._helo or "",
                tls_version=tlsVersion,
                authenticated=self._authenticated,
            )
        return session

    def _currentTLSVersion(self) -> str | None:
        if not self._tls:
            return None
        if self._tlsVersion is None or self._tlsVersion is _HANDSHAKING:
            try:
                self._tlsVersion = self.transport.getHandle().get_protocol_version_name()  # type: ignore[union-attr]
            except Exception:
                return "TLS"
        return self._tlsVersion

    def _authAllowed(self) -> bool:
        return self._tls or self.settings.allowPlaintextAuth

    def _resetSession(self) -> None:
        self._helo = None
        self._esmtp = False
        self._transaction = None
        self._logoutAvatar()

    def _logoutAvatar(self) -> None:
        logout, self._logout = self._logout, None
        self._avatar = None
        self._authenticated = False
        if logout is not None:
            logout()

    # -- commands --------------------------------------------------------------------------

    def smtp_HELO(self, argument: str) -> CommandResult:
        if not _isHeloName(argument):
            return replies.SYNTAX_ERROR.withText("Syntax: HELO hostname")
        self._helo = argument
        self._esmtp = False
        self._transaction = None
        return Reply(250, None, f"{self.settings.hostname}")

    def smtp_EHLO(self, argument: str) -> CommandResult:
        if not _isHeloName(argument):
            return replies.SYNTAX_ERROR.withText("Syntax: EHLO hostname")
        self._helo = argument
        self._esmtp = True
        self._transaction = None
        lines = [
            f"{self.settings.hostname} greets {argument}",
            "PIPELINING",
            f"SIZE {self.settings.limits.max_message_size}",
            "8BITMIME",
            "CHUNKING",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self.settings.security == "starttls" and not self._tls:
            lines.append("STARTTLS")
        if self._authAllowed() and not self._authenticated:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        return Reply(250, None, "\n".join(lines))

    def smtp_NOOP(self, argument: str) -> CommandResult:
        return replies.OK

    def smtp_HELP(self, argument: str) -> CommandResult:
        return replies.HELP

    def smtp_VRFY(self, argument: str) -> CommandResult:
        if not argument:
            return replies.SYNTAX_ERROR.withText("Syntax: VRFY address")
        return replies.VRFY_CANNOT

    def smtp_QUIT(self, argument: str) -> CommandResult:
        self._closeWith(replies.BYE)
        return None

    def smtp_RSET(self, argument: str) -> CommandResult:
        if argument:
            return replies.SYNTAX_ERROR.withText("Syntax: RSET")
        self._transaction = None
        return replies.OK

    def smtp_STARTTLS(self, argument: str) -> CommandResult:
        if self.settings.security != "starttls" or self.settings.tlsContext is None:
            return replies.NOT_IMPLEMENTED.withText("STARTTLS not offered here")
        if self._tls:
            return replies.BAD_SEQUENCE.withText("TLS already active")
        if argument:
            return replies.SYNTAX_ERROR.withText("Syntax: STARTTLS")
        self._write(replies.READY_TLS.wire)
        self._flushReplies()  # in the clear, before the handshake
        # RFC 3207 §4.2: whatever the client sent after STARTTLS in the clear is not trusted,
        # and the session starts over as if newly connected.
        self._buffer, self._pos = b"", 0
        self._resetSession()
        self.transport.startTLS(self.settings.tlsContext)  # type: ignore[union-attr]
        self._tls = True
        self._startHandshakeDeadline()
        return None

    def smtp_AUTH(self, argument: str) -> CommandResult:
        if self._helo is None or not self._esmtp:
            return replies.BAD_SEQUENCE.withText("Send EHLO first")
        if self._authenticated:
            return replies.BAD_SEQUENCE.withText("Already authenticated")
        if self._transaction is not None:
            return replies.BAD_SEQUENCE.withText("AUTH not allowed during a mail transaction")
        if not self._authAllowed():
            return replies.ENCRYPTION_REQUIRED
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if initial:
                return self._authPlain(initial.encode("ascii", "replace"))
            self._lineHandler = self._authPlain
            return replies.AUTH_CHALLENGE
        if mechanism == "LOGIN":
            if initial:
                return self._authLoginUser(initial.encode("ascii", "replace"))
            self._lineHandler = self._authLoginUser
            return replies.AUTH_CHALLENGE.withText("VXNlcm5hbWU6")
        if not mechanism:
            return replies.SYNTAX_ERROR.withText("Syntax: AUTH mechanism [initial-response]")
        return replies.UNKNOWN_AUTH_MECHANISM

    def _decodeAuthResponse(self, line: bytes) -> str | Reply:
        if line.strip() == b"*":
            return replies.AUTH_CANCELLED
        try:
            return base64.b64decode(line.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return replies.BAD_BASE64

    def _authPlain(self, line: bytes) -> CommandResult:
        decoded = self._decodeAuthResponse(line)
        if isinstance(decoded, Reply):
            return decoded
        parts = decoded.split("\0")
        if len(parts) != 3 or not parts[1]:
            return replies.BAD_BASE64.withText("Malformed PLAIN response")
        authzid, user, password = parts
        if authzid and authzid != user:
            return self._authFailed()
        return self._login(user, password)

    def _authLoginUser(self, line: bytes) -> CommandResult:
        decoded = self._decodeAuthResponse(line)
        if isinstance(decoded, Reply):
            return decoded
        user = decoded

        def password(line: bytes) -> CommandResult:
            decodedPassword = self._decodeAuthResponse(line)
            if isinstance(decodedPassword, Reply):
                return decodedPassword
            return self._login(user, decodedPassword)

        self._lineHandler = password
        return replies.AUTH_CHALLENGE.withText("UGFzc3dvcmQ6")

    def _login(self, user: str, password: str) -> CommandResult:
        if self.settings.throttle.blocked(self._clientAddress):
            self._closeWith(replies.TOO_MANY_AUTH_FAILURES)
            return None
        account = _throttledAccount(user)
        if account is not None and self.settings.throttle.accountBlocked(
            account, self._clientAddress
        ):
            # Not checked, so not counted as a failure of this address: the guesser is
            # told to wait, and the owner (who logged in from here before) is let through.
            self.log.info("{client}: logins to a throttled account", client=self._clientAddress)
            self._authFailures += 1
            if self._authFailures >= self.settings.limits.max_auth_failures:
                self._closeWith(replies.TOO_MANY_AUTH_FAILURES)
                return None
            return replies.ACCOUNT_THROTTLED
        d: Deferred[Any] = self.settings.portal.login(
            credentialsFor(user, password), self._session(), ISubmission
        )
        d.addCallbacks(self._loggedIn, self._loginFailed, errbackArgs=(account,))
        return d

    def _loggedIn(self, result: tuple[Any, Any, Callable[[], None]]) -> Reply:
        _, avatar, logout = result
        self._avatar, self._logout, self._authenticated = avatar, logout, True
        metrics.authentications.labels("success").inc()
        self.settings.throttle.succeeded(avatar.account.name, self._clientAddress)
        self.log.info(
            "{client} authenticated as {account}",
            client=self._clientAddress,
            account=avatar.account.name,
        )
        return replies.AUTH_OK

    def _loginFailed(self, failure: Failure, account: str | None = None) -> Any:
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            return self._authFailed(account)
        return failure

    def _authFailed(self, account: str | None = None) -> CommandResult:
        self._authFailures += 1
        self.settings.throttle.failed(self._clientAddress, account)
        metrics.authentications.labels("failure").inc()
        self.log.info("{client} failed to authenticate", client=self._clientAddress)
        if self._authFailures >= self.settings.limits.max_auth_failures:
            self._closeWith(replies.TOO_MANY_AUTH_FAILURES)
            return None
        return replies.AUTH_FAILED

    def smtp_MAIL(self, argument: str) -> CommandResult:
        if self._helo is None:
            return replies.BAD_SEQUENCE.withText("Send HELO or EHLO first")
        if self._avatar is None and self.settings.authMode != "network":
            # Before anything about the command: a client that has not logged in learns
            # nothing of the limits (nor whether its parameters would do).
            return replies.AUTH_REQUIRED
        if self._transaction is not None:
            return replies.BAD_SEQUENCE.withText("Sender already specified")
        if not argument[:5].upper() == "FROM:":
            return replies.SYNTAX_ERROR.withText("Syntax: MAIL FROM:<address>")
        try:
            sender, parameters = parsePathArgument(argument[5:], allowNull=True)
            options = mailOptions(parameters)
        except replies.Refused as e:
            return e.reply
        if options.size is not None and options.size > self.settings.limits.max_message_size:
            return replies.MESSAGE_TOO_BIG

        def validate(avatar: Any) -> Reply | Deferred[Reply]:
            return self._decide(
                lambda: avatar.validateFrom(
                    self._session(), sender, options.smtputf8, options.size
                ),
                accepted,
            )

        def accepted(validated: Any) -> Reply:
            self._transaction = Transaction(validated, smtputf8=options.smtputf8)
            return replies.SENDER_OK

        if self._avatar is not None:
            return validate(self._avatar)
        return self._avatarForMail().addCallback(validate)

    def _avatarForMail(self) -> Deferred[Any]:
        """The avatar of a client that has not authenticated on a relay-by-IP listener: the
        account whose networks hold its address (fails with AUTH_REQUIRED if none does)."""
        networkLogin = self.settings.networkLogin
        assert networkLogin is not None, "network listeners are built with networkLogin"
        d = maybeDeferred(networkLogin, self._session())

        def found(result: tuple[Any, Callable[[], None]] | None) -> Any:
            if result is None:
                raise replies.Refused(replies.AUTH_REQUIRED)
            self._avatar, self._logout = result
            return self._avatar

        return d.addCallback(found)

    def smtp_RCPT(self, argument: str) -> CommandResult:
        transaction = self._transaction
        if transaction is None:
            return replies.BAD_SEQUENCE.withText("Need MAIL before RCPT")
        if not argument[:3].upper() == "TO:":
            return replies.SYNTAX_ERROR.withText("Syntax: RCPT TO:<address>")
        try:
            recipient, parameters = parsePathArgument(argument[3:])
        except replies.Refused as e:
            return e.reply
        if parameters:
            name = next(iter(parameters))
            return replies.UNKNOWN_PARAMETER.withText(f"Unsupported RCPT parameter {name}")
        transaction.rcptAttempts += 1
        avatar = self._avatar

        def accepted(accepted: Recipient) -> Reply:
            if accepted not in transaction.recipientSet:
                transaction.recipientSet.add(accepted)
                transaction.recipients.append(accepted)
            return replies.RECIPIENT_OK

        return self._decide(
            lambda: avatar.validateTo(
                self._session(),
                transaction.sender,
                recipient,
                tuple(transaction.recipients),
                transaction.smtputf8,
            ),
            accepted,
        )

    def smtp_DATA(self, argument: str) -> CommandResult:
        transaction = self._transaction
        if transaction is None:
            return replies.BAD_SEQUENCE.withText("Need MAIL before DATA")
        if not transaction.recipients:
            if transaction.rcptAttempts:
                return replies.NO_VALID_RECIPIENTS
            return replies.BAD_SEQUENCE.withText("Need RCPT before DATA")
        if transaction.chunks is not None:
            return replies.BAD_SEQUENCE.withText("DATA after BDAT; send BDAT ... LAST")
        if argument:
            return replies.SYNTAX_ERROR.withText("Syntax: DATA")
        if self._pos < len(self._buffer):
            # Text sent before the 354 (RFC 2920 §3.1: DATA is the last command of a group):
            # neither message nor commands can be told from it. Discarded, never executed.
            self.log.info(
                "{client}: improper command pipelining after DATA", client=self._clientAddress
            )
            self._transaction = None
            self._closeWith(replies.IMPROPER_PIPELINING)
            return None
        limits = self.settings.limits
        self._reader = DataReader(
            limits.max_message_size, limits.max_line_length, self.settings.spoolDir
        )
        self._reader.startedAt = self.settings.clock.seconds()
        self.setTimeout(limits.data_timeout)
        self._checkDataPaceIn(min(limits.data_rate_grace, limits.data_total_timeout))
        return replies.START_DATA

    def _checkDataPaceIn(self, seconds: float) -> None:
        reader = self._reader
        assert reader is not None
        reader.paceCheck = self.callLater(seconds, self._checkDataPace)

    def _checkDataPace(self) -> None:
        """End a DATA section that has run past its total deadline or below the minimum
        rate; else check again when it next could."""
        reader, limits = self._reader, self.settings.limits
        if reader is None or self._closing:
            return
        reader.paceCheck = None
        elapsed = self.settings.clock.seconds() - reader.startedAt
        # The first data_rate_grace seconds are free: a slow start (a large TCP window
        # filling, a spool warming up) is not held against the client.
        minimum = limits.data_min_rate * (elapsed - limits.data_rate_grace)
        if elapsed >= limits.data_total_timeout or reader.received < minimum:
            self.log.info(
                "{client}: DATA too slow ({octets} octets in {seconds:.0f} s)",
                client=self._clientAddress,
                octets=reader.received,
                seconds=elapsed,
            )
            self._reader = None
            reader.close()
            self._logMessage(replies.DATA_TOO_SLOW, self._transaction, reader.received)
            self._transaction = None
            metrics.countMessage(replies.DATA_TOO_SLOW.code)
            self._closeWith(replies.DATA_TOO_SLOW)
            return
        # When the octets so far stop being enough.
        nextCheck = float(limits.data_total_timeout)
        if limits.data_min_rate:
            enoughUntil = limits.data_rate_grace + reader.received / limits.data_min_rate
            nextCheck = min(nextCheck, enoughUntil)
        self._checkDataPaceIn(max(nextCheck - elapsed, 0.001))

    def _feedData(self, data: bytes) -> None:
        reader = self._reader
        assert reader is not None
        rest = reader.feed(data)
        if rest is None:
            return
        self._reader = None
        self._buffer, self._pos = rest + self._buffer[self._pos :], 0
        self.setTimeout(self.settings.limits.command_timeout)
        transaction, self._transaction = self._transaction, None
        assert transaction is not None
        if reader.refusal is not None:
            reader.close()
            metrics.countMessage(reader.refusal.code)
            self._logMessage(reader.refusal, transaction, reader.received)
            self._reply(reader.refusal)
            return
        message = reader.message()
        reader.close()
        self._deliver(transaction, message)

    def _deliver(self, transaction: Transaction, message: bytes) -> None:
        """Hand a complete message to the avatar; answer with its notification id."""
        avatar = self._avatar
        ids: list[str] = []  # the notification id, once accepted (for the mail log)

        def accepted(notificationId: str) -> Reply:
            ids.append(notificationId)
            return _acceptedReply(notificationId)

        result = self._decide(
            lambda: avatar.acceptMessage(
                self._session(), transaction.sender, tuple(transaction.recipients), message
            ),
            accepted,
        )
        if isinstance(result, Deferred):
            result.addErrback(self._replyForFailure).addCallback(
                self._countMessage, transaction, len(message), ids
            )
        else:
            self._countMessage(result, transaction, len(message), ids)
        self._run(result)

    # -- CHUNKING (RFC 3030) ---------------------------------------------------------------

    def smtp_BDAT(self, argument: str) -> CommandResult:
        words = argument.split()
        if (
            not 1 <= len(words) <= 2
            or not isDecimal(words[0], 20)
            or (len(words) == 2 and words[1].upper() != "LAST")
        ):
            return replies.SYNTAX_ERROR.withText("Syntax: BDAT size [LAST]")
        size, last = int(words[0]), len(words) == 2
        transaction = self._transaction
        refusal: Reply | None = None
        if transaction is None:
            refusal = replies.BAD_SEQUENCE.withText("Need MAIL before BDAT")
        elif not transaction.recipients:
            refusal = (
                replies.NO_VALID_RECIPIENTS
                if transaction.rcptAttempts
                else replies.BAD_SEQUENCE.withText("Need RCPT before BDAT")
            )
        elif transaction.chunkedSize + size > self.settings.limits.max_message_size:
            refusal = replies.MESSAGE_TOO_BIG
        if refusal is None and transaction is not None and transaction.chunks is None:
            transaction.chunks = Spool(self.settings.spoolDir)
        # The chunk's bytes follow whatever the answer: they are read, never taken for commands.
        self._chunk = Chunk(size, size, last, refusal)
        return None

    def _takeChunk(self) -> bool:
        """Read what has arrived of the current BDAT chunk; False when more must come."""
        chunk = self._chunk
        assert chunk is not None
        available = len(self._buffer) - self._pos
        if chunk.remaining and not available:
            return False
        taken = min(chunk.remaining, available)
        if chunk.refusal is None and taken:
            assert self._transaction is not None and self._transaction.chunks is not None
            self._transaction.chunks.write(self._buffer[self._pos : self._pos + taken])
        self._buffer, self._pos = self._buffer[self._pos + taken :], 0
        chunk.remaining -= taken
        if chunk.remaining:
            return False
        self._chunk = None
        self._chunkDone(chunk)
        return True

    def _chunkDone(self, chunk: Chunk) -> None:
        transaction = self._transaction
        if chunk.refusal is not None:
            if transaction is not None and chunk.refusal.code >= 500:
                self._transaction = None  # RFC 3030 §4: a refused chunk ends the message
            if chunk.refusal is replies.MESSAGE_TOO_BIG:
                metrics.countMessage(chunk.refusal.code)
                size = chunk.size + (0 if transaction is None else transaction.chunkedSize)
                self._logMessage(chunk.refusal, transaction, size)
            self._reply(chunk.refusal)
            return
        assert transaction is not None and transaction.chunks is not None
        transaction.chunkedSize += chunk.size
        if not chunk.last:
            self._reply(Reply(250, "2.0.0", f"{chunk.size} octets received"))
            return
        self._transaction = None
        message = transaction.chunks.read()
        transaction.chunks.close()
        problem = lineProblem(message, self.settings.limits.max_line_length - 2)
        if problem is not None:
            metrics.countMessage(problem.code)
            self._logMessage(problem, transaction, len(message))
            self._reply(problem)
            return
        self._deliver(transaction, message)

    def _countMessage(
        self,
        reply: Reply,
        transaction: Transaction | None = None,
        size: int = 0,
        ids: list[str] | None = None,
    ) -> Reply:
        metrics.countMessage(reply.code)
        if reply.code == replies.ACCEPTED.code and storeHealth.down:
            storeHealth.succeeded()
        if transaction is not None:
            self._logMessage(reply, transaction, size, ids[0] if ids else None)
        return reply

    def _logMessage(
        self,
        reply: Reply,
        transaction: Transaction | None,
        size: int,
        notificationId: str | None = None,
    ) -> None:
        """The mail log's line for a message at its end of DATA (or refused in it)."""
        account = getattr(self._avatar, "account", None)
        maillog.message(
            notificationId=notificationId if reply.code == replies.ACCEPTED.code else None,
            account=getattr(account, "name", None),
            client=self._clientAddress,
            tls=self._currentTLSVersion(),
            size=size,
            recipients=0 if transaction is None else len(transaction.recipients),
            code=reply.code,
            dsn=reply.enhanced,
        )
