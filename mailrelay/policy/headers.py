"""
The ``X-IB-*`` header options of SPEC §5: read, checked, turned into ``model.HeaderOptions``.

Header names are compared case-insensitively. Each option may be given once. An ``X-IB-*``
header mailrelay does not know is ignored (and, like every ``X-IB-*`` header, removed from the
message that goes out), so clients written for a richer API of the same family keep working.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from mailrelay.model import HeaderOptions
from mailrelay.policy.decisions import Refusal, RefusalKind

OPTION_PREFIX = "x-ib-"
MAX_BULK_ID = 200
MAX_CALLBACK_DATA = 4000
MAX_URL = 2048
NOTIFY_CONTENT_TYPES = ("application/json", "application/xml")

BULK_ID = "x-ib-bulk-id"
NOTIFY_URL = "x-ib-notify-url"
NOTIFY_CONTENT_TYPE = "x-ib-notify-content-type"
CALLBACK_DATA = "x-ib-callback-data"
INTERMEDIATE_REPORT = "x-ib-intermediate-report"
TRACKING_URL = "x-ib-tracking-url"
KNOWN_OPTIONS = frozenset(
    (BULK_ID, NOTIFY_URL, NOTIFY_CONTENT_TYPE, CALLBACK_DATA, INTERMEDIATE_REPORT, TRACKING_URL)
)

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HOSTNAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|\[?[0-9a-f:.]+\]?")


def isOptionHeader(name: str) -> bool:
    """Whether a header field name is in the ``X-IB-`` namespace (removed before delivery)."""
    return name[:5].lower() == OPTION_PREFIX


def _refuse(name: str, problem: str) -> Refusal:
    return Refusal(RefusalKind.CONTENT_REFUSED, f"Header {_display(name)}: {problem}")


def _display(name: str) -> str:
    return "X-IB-" + name[5:]


def _text(name: str, value: str, limit: int) -> str:
    if not value:
        raise _refuse(name, "is empty")
    if len(value) > limit:
        raise _refuse(name, f"is longer than {limit} characters")
    if _CONTROL.search(value):
        raise _refuse(name, "has control characters")
    return value


def _url(name: str, value: str) -> str:
    _text(name, value, MAX_URL)
    problem = "must be an absolute http:// or https:// URL with a host name"
    if any(char.isspace() for char in value):
        raise _refuse(name, problem + ", without spaces")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked
    except ValueError:
        raise _refuse(name, problem) from None
    host = parts.hostname or ""
    if parts.scheme.lower() not in ("http", "https") or not _HOSTNAME.fullmatch(host):
        raise _refuse(name, problem)
    return value


def _boolean(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise _refuse(name, f"must be true or false, not {value[:40]!r}")
    return lowered == "true"


def _contentType(name: str, value: str) -> str:
    lowered = value.lower()
    if lowered not in NOTIFY_CONTENT_TYPES:
        raise _refuse(name, f"must be {' or '.join(NOTIFY_CONTENT_TYPES)}, not {value[:60]!r}")
    return lowered


def parseHeaderOptions(fields: Iterable[tuple[str, str]]) -> HeaderOptions:
    """
    The options set by the ``X-IB-*`` fields among ``fields`` (name, unfolded value) pairs;
    other fields are skipped. Raises ``Refusal(CONTENT_REFUSED)`` naming the header
    when an option is malformed or given twice.
    """
    values: dict[str, str] = {}
    for rawName, rawValue in fields:
        name = rawName.lower()
        if name not in KNOWN_OPTIONS:
            continue
        if name in values:
            raise _refuse(name, "is given more than once")
        values[name] = rawValue.strip(" \t")
    bulkId = values.get(BULK_ID)
    notifyUrl = values.get(NOTIFY_URL)
    contentType = values.get(NOTIFY_CONTENT_TYPE)
    callbackData = values.get(CALLBACK_DATA)
    intermediate = values.get(INTERMEDIATE_REPORT)
    trackingUrl = values.get(TRACKING_URL)
    return HeaderOptions(
        bulk_id=None if bulkId is None else _text(BULK_ID, bulkId, MAX_BULK_ID),
        notify_url=None if notifyUrl is None else _url(NOTIFY_URL, notifyUrl),
        notify_content_type=(
            NOTIFY_CONTENT_TYPES[0]
            if contentType is None
            else _contentType(NOTIFY_CONTENT_TYPE, contentType)
        ),
        callback_data=(
            None if callbackData is None else _text(CALLBACK_DATA, callbackData, MAX_CALLBACK_DATA)
        ),
        intermediate_report=(
            False if intermediate is None else _boolean(INTERMEDIATE_REPORT, intermediate)
        ),
        tracking_url=None if trackingUrl is None else _url(TRACKING_URL, trackingUrl),
    )
