"""
The mail log: one line per message at the end of DATA (accepted or refused) and one per
delivery attempt, what an operator greps first (Postfix's habit).

The lines go through :mod:`twisted.logger` under the namespace ``mailrelay.maillog`` with
their values as fields, so the same event is a human-readable line in twistd's text log and
an object in ``--log-format json`` (:func:`jsonLinesObserver`). They carry ids, addresses,
sizes and reply codes: never a credential nor any of the message's text.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
import weakref
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventAsText,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

NAMESPACE = "mailrelay.maillog"
log = Logger(namespace=NAMESPACE)

MESSAGE_FORMAT = (
    "message {id} {outcome} account={account} client={client} tls={tls} size={size} "
    "nrcpt={recipients} reply={code} {dsn}"
)
DELIVERY_FORMAT = (
    "delivery {id} to={recipient} relay={relay} status={status} dsn={dsn} "
    "delay={delay:.1f}s ({reply})"
)


PREFORMATTED = "{text}"
"""The format of events whose ``text`` field is their line already, made with str.format:
Twisted's formatter (which allows calls and attributes in a format) takes 15 us a line,
str.format 1 us; at thousands of messages a second that is a few per cent of the relay."""


def emitPreformatted(logger: Logger, level: LogLevel, text: str, **fields: Any) -> None:
    """Emit a :data:`PREFORMATTED` event of ``text`` and ``fields`` from ``logger``: what
    ``logger.emit`` does, less its check that ``level`` is one (a walk over every level),
    for the lines logged once a message."""
    fields.update(
        log_logger=logger,
        log_level=level,
        log_namespace=logger.namespace,
        log_source=logger.source,
        log_format=PREFORMATTED,
        log_time=time.time(),
        text=text,
    )
    logger.observer(fields)


def message(
    *,
    notificationId: str | None,
    account: str | None,
    client: str,
    tls: str | None,
    size: int,
    recipients: int,
    code: int,
    dsn: str | None,
) -> None:
    """Log a message's end of DATA: ``notificationId`` None when it was refused."""
    fields = {
        "id": notificationId or "-",
        "outcome": "accepted" if notificationId else "refused",
        "account": account or "-",
        "client": client or "-",
        "tls": tls or "none",
        "size": size,
        "recipients": recipients,
        "code": code,
        "dsn": dsn or "-",
    }
    emitPreformatted(log, LogLevel.info, MESSAGE_FORMAT.format_map(fields), **fields)


def delivery(
    *,
    notificationId: str,
    recipient: str,
    relay: str | None,
    status: str,
    dsn: str,
    delay: float,
    reply: str,
) -> None:
    """Log one recipient's outcome of a delivery attempt (``reply``: the remote one, or the
    local reason)."""
    fields = {
        "id": notificationId,
        "recipient": recipient,
        "relay": relay or "none",
        "status": status,
        "dsn": dsn,
        "delay": delay,
        "reply": reply,
    }
    emitPreformatted(log, LogLevel.info, DELIVERY_FORMAT.format_map(fields), **fields)


LOG_FORMATS = ("text", "json")


class TurnOutput:
    """
    Log lines for ``outFile``, written together once the reactor's turn is over: one system
    call for the lines a turn logs (a relay delivering thousands of messages a second logs a
    line for each) instead of one a line. A line comes out at once, after any still waiting,
    when it is urgent (an error), when it is logged outside the reactor's thread, or when no
    reactor runs; what waits is written when the reactor shuts down and at exit. ``reactor``:
    the one whose turns count (default: the one installed, if any: logging never installs one).
    """

    def __init__(self, outFile: IO[str], reactor: Any = None) -> None:
        self._outFile = outFile
        self._reactor = reactor
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._watchingShutdown = False
        _outputs.add(self)

    def write(self, line: str, urgent: bool = False) -> None:
        with self._lock:
            self._lines.append(line)
            reactor = self._runningReactor() if not urgent and isInIOThread() else None
            if reactor is None:
                self._writeLocked()
                return
            if self._scheduled:
                return
            self._scheduled = True
        reactor.callLater(0, self.flush)
        if not self._watchingShutdown:
            self._watchingShutdown = True
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def flush(self) -> None:
        with self._lock:
            self._writeLocked()

    def _runningReactor(self) -> Any:
        reactor = self._reactor
        if reactor is None:
            reactor = sys.modules.get("twisted.internet.reactor")
        return reactor if reactor is not None and getattr(reactor, "running", False) else None

    def _writeLocked(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        try:
            self._outFile.write(text)
            self._outFile.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log: nowhere left to say so


_outputs: weakref.WeakSet[TurnOutput] = weakref.WeakSet()


@atexit.register
def _flushAll() -> None:
    for output in list(_outputs):
        output.flush()


def _urgent(event: dict[str, Any]) -> bool:
    level = event.get("log_level")
    return level is LogLevel.error or level is LogLevel.critical


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Every event as one JSON object per line: ``time`` (ISO 8601, UTC), ``level``,
    ``namespace``, ``text`` (the event formatted as the text log would show it, with a
    traceback for a failure), and the event's own fields that are plain values (strings,
    numbers, booleans, None); Twisted's ``log_*`` bookkeeping is left out.
    """

    def __init__(self, outFile: IO[str], reactor: Any = None) -> None:
        self._output = TurnOutput(outFile, reactor)

    def __call__(self, event: dict[str, Any]) -> None:
        document: dict[str, Any] = {
            "time": _isoTime(event.get("log_time")),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
        }
        for key, value in event.items():
            if key[:4] != "log_" and key not in document:
                if value is None or isinstance(value, str | int | float | bool):
                    document[key] = value
        if event.get("log_format") == PREFORMATTED:
            text = event.get("text", "")
        else:
            text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        document["text"] = text
        line = json.dumps(document, separators=(",", ":"), default=str) + "\n"
        self._output.write(line, urgent=_urgent(event))


@implementer(ILogObserver)
class TextLinesObserver:
    """
    twistd's text lines (``2024-05-01T12:00:00+0000 [namespace#info] text``), for the text
    log: the same as twistd's own observer, but an event in :data:`PREFORMATTED` form costs
    a string join, not Twisted's formatter, and the time stamp is made once a second.
    ``stamped=False``: without the time stamp (a worker's lines, which the main process
    stamps as it relays them).
    """

    def __init__(self, outFile: IO[str], stamped: bool = True, reactor: Any = None) -> None:
        self._output = TurnOutput(outFile, reactor)
        self._stamped = stamped
        self._second = -1
        self._stamp = ""

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_format") != PREFORMATTED or "log_failure" in event:
            if self._stamped:
                line = formatEventAsClassicLogText(event)
            else:
                line = eventAsText(event, includeTimestamp=False) + "\n"
            if line is None:
                return
        else:
            system = event.get("log_system")
            if system is None:
                level = getattr(event.get("log_level"), "name", "-")
                system = f"{event.get('log_namespace', '-')}#{level}"
            line = f"[{system}] {event.get('text', '')}\n"
            if self._stamped:
                when = event.get("log_time") or time.time()
                if int(when) != self._second:
                    self._second = int(when)
                    self._stamp = formatTime(self._second)
                line = f"{self._stamp} {line}"
        self._output.write(line, urgent=_urgent(event))


def _isoTime(when: float | None) -> str:
    if when is None:
        when = time.time()
    seconds = int(when)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (
        f".{int((when - seconds) * 1000):03d}Z"
    )


def jsonLinesObserver(outFile: IO[str], reactor: Any = None) -> JSONLinesObserver:
    """An observer writing :class:`JSONLinesObserver` lines to ``outFile``."""
    return JSONLinesObserver(outFile, reactor)


def textLinesObserver(
    outFile: IO[str], stamped: bool = True, reactor: Any = None
) -> TextLinesObserver:
    """An observer writing :class:`TextLinesObserver` lines to ``outFile``."""
    return TextLinesObserver(outFile, stamped, reactor)
