"""
Replies from a remote SMTP server, and the parser that reads them off the wire.

The server is untrusted: the parser holds at most one line (:data:`MAX_LINE` octets) and one
reply (:data:`MAX_LINES` lines) in memory, and anything that is not an RFC 5321 reply line
raises :class:`SMTPProtocolError` (after which the connection is of no further use).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LINE = 2048
"""Octets in one reply line, without its line end (RFC 5321 allows 512; servers exceed it)."""

MAX_LINES = 100
"""Lines in one multi-line reply (an EHLO reply has a dozen or two)."""

MAX_TEXT = 500
"""Characters of :attr:`SMTPReply.text`, which goes into status trails and bounces."""

_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SMTPProtocolError(Exception):
    """The server sent something that is not an SMTP reply (or too much of one)."""


@dataclass(frozen=True)
class SMTPReply:
    """One complete reply: its code and the text of each line (code and separator removed)."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code at the start of the first line (``"5.1.1"``), if any."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        return match.group(0) if match else None

    @property
    def text(self) -> str:
        """
        The reply as one line for humans and status trails: ``"550 5.1.1 No such user"``.

        Lines are joined with a space; an enhanced code repeated at the start of every line is
        kept once; control characters are removed (the text is the server's, and goes into
        logs, bounces and HTTP answers) and the result is cut to about :data:`MAX_TEXT`.
        """
        enhanced = self.enhanced
        parts = [str(self.code)]
        for index, line in enumerate(self.lines):
            if index and enhanced and line.startswith(enhanced):
                line = line[len(enhanced) :].lstrip(" ")
            if line:
                parts.append(line)
        text = " ".join(_CONTROL.sub("", part) for part in parts)
        if len(text) > MAX_TEXT:
            text = text[: MAX_TEXT - 3] + "..."
        return text

    @property
    def isPositive(self) -> bool:
        """2xx or 3xx: the command was accepted (or the server waits for more)."""
        return 200 <= self.code < 400

    @property
    def isTemporary(self) -> bool:
        """4xx: refused for now; the same command may succeed later."""
        return 400 <= self.code < 500

    @property
    def isPermanent(self) -> bool:
        """5xx: refused; repeating the command will not help."""
        return self.code >= 500


class ReplyParser:
    """
    Turns the bytes a server sends into :class:`SMTPReply` values.

    Lines end with CRLF (a bare LF is accepted too). A reply is one or more lines with the same
    code, every one but the last with ``-`` after the code. After an error every further
    :meth:`feed` raises too.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._code: int | None = None
        self._lines: list[str] = []
        self._error: SMTPProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Octets received but not yet part of a complete reply (a partial line or reply)."""
        return len(self._buffer) + sum(len(line) for line in self._lines)

    def feed(self, data: bytes) -> list[SMTPReply]:
        """The replies completed by ``data``, in order; raises :class:`SMTPProtocolError`."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except SMTPProtocolError as error:
            self._error = error
            self._buffer = b""
            self._lines = []
            raise

    def _feed(self, data: bytes) -> list[SMTPReply]:
        replies = []
        buffer = self._buffer + data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)
        self._buffer = buffer[start:]
        # A line end that has not arrived may never arrive: bound what waits for it.
        if len(self._buffer) > MAX_LINE + 1:
            raise SMTPProtocolError(f"reply line longer than {MAX_LINE} octets")
        return replies

    def _line(self, line: bytes) -> SMTPReply | None:
        if len(line) > MAX_LINE:
            raise SMTPProtocolError(f"reply line longer than {MAX_LINE} octets")
        match = _LINE.fullmatch(line)
        if match is None:
            raise SMTPProtocolError("malformed reply line")
        code = int(match.group(1))
        if self._code is not None and code != self._code:
            raise SMTPProtocolError("reply code changes within a multi-line reply")
        if len(self._lines) >= MAX_LINES:
            raise SMTPProtocolError(f"reply longer than {MAX_LINES} lines")
        self._code = code
        self._lines.append(match.group(3).decode("utf-8", "replace"))
        if match.group(2) == b"-":
            return None
        reply = SMTPReply(code, tuple(self._lines))
        self._code = None
        self._lines = []
        return reply
