"""
The mail log: one line per message at the end of DATA (accepted or refused) and one per
delivery attempt, what an operator greps first (Postfix's habit).

The lines go through :mod:`twisted.logger` under the namespace ``mailrelay.maillog`` with
their values as fields, so the same event is a human-readable line in twistd's text log and
an object in ``--log-format json`` (:func:`jsonLinesObserver`). They carry ids, addresses,
sizes and reply codes: never a credential nor any of the message's text.
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    Logger,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
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
    log.info(PREFORMATTED, text=MESSAGE_FORMAT.format_map(fields), **fields)


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
    log.info(PREFORMATTED, text=DELIVERY_FORMAT.format_map(fields), **fields)


LOG_FORMATS = ("text", "json")


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Every event as one JSON object per line: ``time`` (ISO 8601, UTC), ``level``,
    ``namespace``, ``text`` (the event formatted as the text log would show it, with a
    traceback for a failure), and the event's own fields that are plain values (strings,
    numbers, booleans, None); Twisted's ``log_*`` bookkeeping is left out.
    """

    def __init__(self, outFile: IO[str]) -> None:
        self._outFile = outFile

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
        self._outFile.write(json.dumps(document, separators=(",", ":"), default=str) + "\n")
        self._outFile.flush()


@implementer(ILogObserver)
class TextLinesObserver:
    """
    twistd's text lines (``2024-05-01T12:00:00+0000 [namespace#info] text``), for the text
    log: the same as twistd's own observer, but an event in :data:`PREFORMATTED` form costs
    a string join, not Twisted's formatter, and the time stamp is made once a second.
    """

    def __init__(self, outFile: IO[str]) -> None:
        self._outFile = outFile
        self._second = -1
        self._stamp = ""

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_format") != PREFORMATTED or "log_failure" in event:
            line = formatEventAsClassicLogText(event)
            if line is None:
                return
        else:
            when = event.get("log_time") or time.time()
            if int(when) != self._second:
                self._second = int(when)
                self._stamp = formatTime(self._second)
            system = event.get("log_system")
            if system is None:
                level = getattr(event.get("log_level"), "name", "-")
                system = f"{event.get('log_namespace', '-')}#{level}"
            line = f"{self._stamp} [{system}] {event.get('text', '')}\n"
        self._outFile.write(line)
        self._outFile.flush()


def _isoTime(when: float | None) -> str:
    if when is None:
        when = time.time()
    seconds = int(when)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + (
        f".{int((when - seconds) * 1000):03d}Z"
    )


def jsonLinesObserver(outFile: IO[str]) -> JSONLinesObserver:
    """An observer writing :class:`JSONLinesObserver` lines to ``outFile``."""
    return JSONLinesObserver(outFile)


def textLinesObserver(outFile: IO[str]) -> TextLinesObserver:
    """An observer writing :class:`TextLinesObserver` lines to ``outFile``."""
    return TextLinesObserver(outFile)
