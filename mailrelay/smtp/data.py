"""
Reading the DATA section in bulk.

The message text is scanned a chunk at a time with ``bytes.find``/``replace``/``count`` (C loops),
never a line at a time in Python: the end marker ``CRLF . CRLF`` is searched for across chunk
boundaries, dot-stuffing is undone on whole chunks, and the checks that need line structure
(bare CR or LF, line length) are done with counts and one ``split`` per chunk.

Only ``CRLF . CRLF`` ends a message. A bare CR or LF never does; a message that carries one is
refused as a whole (it is how SMTP smuggling works), as is one with a line over the limit or one
over the size limit; in each case the rest of the message is read and thrown away, never
executed as commands.

The two scans every octet goes through -- for the next line that starts with a dot, and for bare
line endings and over-long lines -- run in the optional C extension ``_mailrelay_scan`` where it
was built (at memchr speed, several times faster on large messages), else in the pure-Python
versions below, which are the reference: the tests hold the two to the same answers.
"""

from __future__ import annotations

from tempfile import TemporaryFile
from typing import IO

from twisted.internet.interfaces import IDelayedCall

from mailrelay.smtp import replies
from mailrelay.smtp.replies import Reply

_CRLF = b"\r\n"
_END = b"\r\n.\r\n"
_DOT_LINE = b"\r\n."
# Messages up to this size stay in memory; larger ones are spooled to a temporary file.
SPOOL_IN_MEMORY = 1024 * 1024


# What line_problem answers: no problem, a bare CR or LF, a line over the limit.
_FINE, _BARE, _TOO_LONG = 0, 1, 2


def pyLineProblem(text: bytes | memoryview, maxLine: int) -> int:
    """
    The pure-Python ``line_problem``: ``_BARE`` if ``text`` holds a CR or LF that is not part
    of a CRLF, else ``_TOO_LONG`` if a line (without its CRLF; the text after the last CRLF is
    a line too) is longer than ``maxLine`` octets, else ``_FINE``.
    """
    if isinstance(text, memoryview):  # the reader's chunks: this fallback needs bytes methods
        text = text.tobytes()
    # Each CRLF holds one CR and one LF, so any more of them than 2 per CRLF are bare.
    lineEndings = len(text) - len(text.translate(None, _CRLF))
    if lineEndings != 2 * text.count(_CRLF):
        return _BARE
    # If every aligned window of half the limit holds an LF, no two LFs are a limit or more
    # apart: a few C-level finds instead of splitting into every line. Only text with an
    # LF-less window is split to measure its lines exactly.
    window = (maxLine + 2) // 2
    for position in range(0, len(text), window):
        if text.find(b"\n", position, position + window) < 0:
            if max(map(len, text.split(_CRLF))) > maxLine:
                return _TOO_LONG
            break
    return _FINE


def pyFindDotLine(text: bytes, start: int) -> int:
    """The pure-Python ``find_dot_line``: where the first CRLF followed by a dot is, at or
    after ``start``, or -1."""
    return text.find(_DOT_LINE, start)


try:
    from _mailrelay_scan import find_dot_line as findDotLine
    from _mailrelay_scan import line_problem as _lineProblemCode

    NATIVE_SCAN = True
except ImportError:  # built without a C compiler: the same answers, more slowly
    findDotLine, _lineProblemCode = pyFindDotLine, pyLineProblem
    NATIVE_SCAN = False


LINE_TOO_LONG_IN_MESSAGE = replies.LINE_TOO_LONG.withText("Line too long; message discarded")
_PROBLEMS: dict[int, Reply | None] = {
    _FINE: None,
    _BARE: replies.BARE_LINE_ENDING,
    _TOO_LONG: LINE_TOO_LONG_IN_MESSAGE,
}


def lineProblem(text: bytes | memoryview, maxLine: int) -> Reply | None:
    """
    Why ``text`` (whole lines, each ending in CRLF) cannot be a message: a bare CR or LF, or a
    line longer than ``maxLine`` octets without its CRLF. None if it can.
    """
    return _PROBLEMS[_lineProblemCode(text, maxLine)]


class Spool:
    """
    A message's bytes as they arrive: in memory up to ``SPOOL_IN_MEMORY`` octets, past that
    in an unnamed file (mode 0600, gone when closed) in ``directory``, so that a large message
    -- DATA or BDAT chunks -- waits on disk, not in memory, until it is complete.
    """

    def __init__(self, directory: str | None = None) -> None:
        self._directory = directory
        self._file: IO[bytes] | None = None
        self._parts: list[bytes | memoryview] = []
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._parts.append(data)
        if self.size > SPOOL_IN_MEMORY:
            self._file = TemporaryFile(dir=self._directory)
            self._file.writelines(self._parts)
            self._parts = []

    @property
    def onDisk(self) -> bool:
        """Whether what was written waits in a file (past ``SPOOL_IN_MEMORY``)."""
        return self._file is not None

    def read(self) -> bytes:
        """Everything written, in one piece."""
        if self._file is None:
            return b"".join(self._parts)
        self._file.seek(0)
        return self._file.read()

    def close(self) -> None:
        """Forget what was written (and close the file)."""
        self._parts = []
        self.size = 0
        if self._file is not None:
            self._file.close()
            self._file = None


class DataReader:
    """
    Collects one message's text from ``feed`` calls until the end marker.

    ``feed`` returns ``None`` while the message continues, or the bytes that followed the end
    marker (possibly empty: pipelined commands) once it is complete. Then ``refusal`` is the
    reply that refuses the message (or ``None``) and ``message()`` returns the unstuffed text.
    """

    def __init__(self, maxSize: int, maxLineLength: int, spoolDir: str | None = None) -> None:
        self._maxSize = maxSize
        # The limit is on a line including its CRLF; split() measures lines without it.
        self._maxLine = maxLineLength - 2
        self._spool = Spool(spoolDir)
        self._carry = b""
        # Whether _carry starts at the beginning of a line. False only after an over-long line
        # was cut short, when the next CRLF . CRLF must not be taken for a line that starts there.
        self._atLineStart = True
        self.size = 0
        self.refusal: Reply | None = None
        # Octets fed so far, kept or not, and when the DATA section started (the protocol's
        # clock): what its minimum rate and total deadline are checked against.
        self.received = 0
        self.startedAt = 0.0
        self.paceCheck: IDelayedCall | None = None  # the protocol's next look at both

    def feed(self, data: bytes) -> bytes | None:
        self.received += len(data)
        # A virtual CRLF before a line start lets one search find the end marker (and dot-stuffed
        # lines) at the very start of the buffer as well as after any real CRLF.
        buffer = (_CRLF if self._atLineStart else b"") + self._carry + data
        offset = 2 if self._atLineStart else 0
        # A line that starts with a dot is the end marker or dot-stuffed. Most buffers have
        # none: one search then rules out both, and the unstuffing pass is skipped.
        firstDot = findDotLine(buffer, 0)
        if firstDot >= 0:
            end = buffer.find(_END, firstDot)
            if end >= 0:
                # Only lines before the end marker can be stuffed: none, if it is the first.
                self._take(buffer, offset, end + 2, stuffed=firstDot < end)
                self._carry = b""
                return buffer[end + 5 :]
        lastLineEnd = buffer.rfind(_CRLF)
        if lastLineEnd >= offset:
            self._take(buffer, offset, lastLineEnd + 2, stuffed=firstDot >= 0)
            self._carry = buffer[lastLineEnd + 2 :]
            self._atLineStart = True
        else:
            self._carry = buffer[offset:]
            self._atLineStart = offset == 2
        if len(self._carry) > self._maxLine + 1:
            # A line that never ends: refuse the message and keep only what could still be
            # the start of a CRLF . CRLF, so a client cannot make us buffer without bound.
            self._refuse(LINE_TOO_LONG_IN_MESSAGE)
            self._carry = self._carry[-1:]
            self._atLineStart = False
        return None

    def _take(self, buffer: bytes, start: int, stop: int, stuffed: bool) -> None:
        """Account for ``buffer[start:stop]``, complete lines each ending in CRLF; ``stuffed``:
        whether any line of ``buffer`` may start with a dot."""
        if self.refusal is not None:
            return
        # A view, not a copy: message() joins the pieces, which is their one copy.
        chunk: bytes | memoryview = memoryview(buffer)[start:stop]
        problem = lineProblem(chunk, self._maxLine)
        if problem is not None:
            self._refuse(problem)
            return
        if stuffed:
            # Undo dot-stuffing (RFC 5321 §4.5.2): a line's leading dot is removed. The CRLF
            # before the first line is the virtual one, so search from it and drop it after.
            if start == 2:
                chunk = buffer[0:stop].replace(_DOT_LINE, _CRLF)[2:]
            else:
                chunk = buffer[start:stop].replace(_DOT_LINE, _CRLF)
        self.size += len(chunk)
        if self.size > self._maxSize:
            self._refuse(replies.MESSAGE_TOO_BIG)
            return
        self._store(chunk)

    def _store(self, chunk: bytes | memoryview) -> None:
        self._spool.write(chunk)

    def _refuse(self, reply: Reply) -> None:
        if self.refusal is None:
            self.refusal = reply
        self._discard()

    def _discard(self) -> None:
        self._spool.close()

    def message(self) -> bytes:
        """The message text, dot-stuffing undone, lines ending in CRLF."""
        return self._spool.read()

    def close(self) -> None:
        """Release the spool file, if any, and stop the pace check."""
        self._discard()
        if self.paceCheck is not None and self.paceCheck.active():
            self.paceCheck.cancel()
        self.paceCheck = None
