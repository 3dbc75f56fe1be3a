"""
Every SMTP reply mailrelay sends, as named constants (SPEC §4's table).

Code and enhanced code are the contract; the text is for humans and may be specialised with
:meth:`Reply.withText` (e.g. to name the refused sender). Tests compare against these constants.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str | None
    text: str

    def withText(self, text: str) -> Reply:
        """The same reply codes with another human-readable text."""
        return Reply(self.code, self.enhanced, text)

    @functools.cached_property
    def wire(self) -> bytes:
        """The reply on the wire, made once per Reply (the named constants are reused)."""
        return self.toBytes()

    def toBytes(self) -> bytes:
        """
        The reply on the wire; a text with newlines becomes a multi-line reply. Control
        characters (which client input may carry into a reply's text) become ``?``: a reply
        can neither break the line structure nor drive a client's terminal.
        """
        lines = [_CONTROL.sub("?", line) for line in self.text.split("\n")]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def isPositive(self) -> bool:
        return self.code < 400

    @property
    def isTemporary(self) -> bool:
        return 400 <= self.code < 500


class Refused(Exception):
    """Raised (or returned through a Deferred) inside the SMTP edge to answer a command with
    ``reply``. (Policy refuses with :class:`mailrelay.policy.decisions.Refusal`, which
    :mod:`mailrelay.smtp.refusals` translates.)"""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply


OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
ACCEPTED = Reply(250, "2.0.0", "OK")
"""End of DATA: the message is queued. Sent with the text ``OK id=<notification id>``."""
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
BYE = Reply(221, "2.0.0", "Bye")
VRFY_CANNOT = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214, "2.0.0", "Commands: HELO EHLO STARTTLS AUTH MAIL RCPT DATA RSET NOOP HELP VRFY QUIT"
)
AUTH_OK = Reply(235, "2.7.0", "Authentication succeeded")
AUTH_CHALLENGE = Reply(334, None, "")

UNKNOWN_COMMAND = Reply(500, "5.5.1", "Invalid command")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
UNKNOWN_AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
NO_LOGIN_IN_TIME = Reply(421, "4.7.0", "No authentication in time, closing connection")
LOGIN_WITHDRAWN = Reply(
    421, "4.7.0", "This session's login no longer holds (account, key or network changed), closing"
)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
SENDER_NOT_ALLOWED = Reply(553, "5.7.1", "Sender address not registered to this account")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
BAD_RECIPIENT_SYNTAX = Reply(553, "5.1.3", "Recipient address syntax invalid")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Sender address syntax invalid")
NO_SUCH_RECIPIENT = Reply(550, "5.1.1", "Recipient not deliverable on any channel of this account")
RATE_EXCEEDED = Reply(451, "4.7.1", "Message rate limit exceeded, try again later")
QUOTA_EXCEEDED = Reply(452, "4.2.2", "Daily quota exceeded")
SMS_CREDITS_EXHAUSTED = Reply(452, "4.2.2", "SMS credits do not cover this message")
CONTENT_REFUSED = Reply(550, "5.6.0", "Message content refused")
BARE_LINE_ENDING = Reply(550, "5.6.0", "Message contains a bare CR or LF; lines must end in CRLF")
TEMPORARY_FAILURE = Reply(451, "4.3.0", "Temporary failure, please try again later")
TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
DATA_TOO_SLOW = Reply(421, "4.4.2", "DATA too slow or too long, closing connection")
# Postfix's answer to text sent before the 354 (RFC 2920 §3.1: DATA ends a pipelined group).
IMPROPER_PIPELINING = Reply(554, "5.5.0", "Improper command pipelining after DATA, closing")
ACCOUNT_THROTTLED = Reply(454, "4.7.0", "Too many failed logins to this account, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
