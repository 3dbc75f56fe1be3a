"""
Open and click tracking (SPEC §8.5): a message's HTML links rewritten, at delivery time, to
``{base_url}/t/c/<token>`` and a 1x1 image ``{base_url}/t/o/<token>`` added.

A token carries the notification, the recipient and (for a click) the link, with a MAC under
a key only the relay has: the endpoint that serves ``/t/`` needs no lookup to redirect, and no
one can make it redirect elsewhere (a changed token fails the MAC: 404).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import quopri
import re
from dataclasses import dataclass
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from io import BytesIO
from typing import Literal

from mailrelay.model import Notification, Recipient

TokenKind = Literal["o", "c"]
"""``o``: an open (the image); ``c``: a click (a link)."""

KEY_NAME = "tracking"
"""The name of the tracking tokens' MAC key in the store (``IReportQueue.sharedKey``)."""

_MAC_BYTES = 16
_LINK = re.compile(
    r"""(<a\b[^>]*?\bhref\s*=\s*)(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE | re.DOTALL
)
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_SMTP = policy.compat32.clone(linesep="\r\n")


@dataclass(frozen=True)
class TrackedToken:
    """What a valid token says."""

    kind: TokenKind
    notification_id: str
    recipient: Recipient
    link: str  # "" for an open


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tracker:
    """Makes and reads tokens under ``key``, and rewrites messages for ``baseUrl``. ``key``
    may be set later (it is read from the store once that is open); until then
    :meth:`rewrite` raises RuntimeError, which delays the delivery rather than sending
    untracked links."""

    def __init__(self, baseUrl: str, key: bytes | None = None) -> None:
        self.baseUrl = baseUrl.rstrip("/")
        self.key = key

    def __repr__(self) -> str:
        return f"Tracker({self.baseUrl!r})"  # never the key

    def wants(self, notification: Notification) -> bool:
        """Whether ``notification``'s e-mail is tracked: it named an ``X-IB-tracking-url``."""
        return bool(notification.options.tracking_url)

    def _mac(self, kind: str, payload: str) -> bytes:
        if self.key is None:
            raise RuntimeError("the tracking key is not loaded yet")
        digest = hmac.new(self.key, f"{kind}.{payload}".encode(), hashlib.sha256).digest()
        return digest[:_MAC_BYTES]

    def token(
        self, kind: TokenKind, notificationId: str, recipient: Recipient, link: str = ""
    ) -> str:
        """A token for ``kind`` (``o`` or ``c``)."""
        payload = _b64(json.dumps([notificationId, recipient.key, link]).encode())
        return f"{payload}.{_b64(self._mac(kind, payload))}"

    def read(self, kind: TokenKind, token: str) -> TrackedToken | None:
        """What ``token`` says, or None if it is not one this relay made for ``kind``."""
        payload, _, mac = token.partition(".")
        try:
            if not hmac.compare_digest(_unb64(mac), self._mac(kind, payload)):
                return None
            notificationId, key, link = json.loads(_unb64(payload))
        except (ValueError, binascii.Error, TypeError, RuntimeError):
            return None
        channel, _, address = str(key).partition(":")
        if channel not in ("email", "sms") or not address:
            return None
        return TrackedToken(kind, str(notificationId), Recipient(address, channel), str(link))  # type: ignore[arg-type]

    def url(self, kind: TokenKind, token: str) -> str:
        return f"{self.baseUrl}/t/{kind}/{token}"

    def rewriteHtml(self, text: str, notificationId: str, recipient: Recipient) -> str:
        """``text`` (HTML) with its http(s) links tracked and the image added."""

        def track(match: re.Match[str]) -> str:
            quoted = match.group(2) if match.group(2) is not None else match.group(3)
            link = html.unescape(quoted).strip()
            if not link.lower().startswith(("http://", "https://")):
                return match.group(0)
            tracked = self.url("c", self.token("c", notificationId, recipient, link))
            return f'{match.group(1)}"{html.escape(tracked)}"'

        text = _LINK.sub(track, text)
        pixel = (
            f'<img src="{html.escape(self.url("o", self.token("o", notificationId, recipient)))}"'
            ' width="1" height="1" alt="" style="border:0">'
        )
        ends = list(_BODY_END.finditer(text))
        if ends:
            at = ends[-1].start()
            return text[:at] + pixel + text[at:]
        return text + pixel

    def rewrite(self, message: bytes, notification: Notification, recipient: Recipient) -> bytes:
        """``message`` with the HTML parts (not attachments) tracked for ``recipient``; the
        same bytes if it has none. Deterministic: the same input gives the same bytes."""
        parsed = BytesParser(policy=policy.compat32).parsebytes(message)
        changed = False
        for part in parsed.walk():
            if part.is_multipart() or part.get_content_type() != "text/html":
                continue
            if (part.get("Content-Disposition") or "").lower().startswith("attachment"):
                continue
            _setHtml(part, self.rewriteHtml(_html(part), notification.notification_id, recipient))
            changed = True
        if not changed:
            return message
        out = BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=_SMTP).flatten(parsed)
        return out.getvalue()


def _html(part: Message) -> str:
    raw = part.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return raw.decode(part.get_content_charset() or "utf-8", "replace")


def _setHtml(part: Message, text: str) -> None:
    charset = part.get_content_charset() or "utf-8"
    try:
        data = text.encode(charset)
    except (LookupError, UnicodeEncodeError):
        charset, data = "utf-8", text.encode("utf-8")
        part.set_param("charset", charset)
    encoding = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if encoding == "quoted-printable":
        part.set_payload(quopri.encodestring(data).decode("ascii"))
        return
    if (
        encoding != "base64"
        and data.isascii()
        and all(len(line) < 990 for line in data.splitlines())
    ):
        part.set_payload(data.decode("ascii"))
        return
    # Anything else leaves as base64: safe for any line length and any octet.
    del part["Content-Transfer-Encoding"]
    part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(base64.encodebytes(data).decode("ascii"))
