"""
HTTP Basic logins for the status API, through the same portal, realm and failure throttle as
SMTP AUTH.

A login is account name + password or ``App`` + API key (``credentialsFor`` decides), with a
:class:`~mailrelay.model.SessionInfo` of listener ``web`` as the mind, so the realm applies the
same rules as on SMTP: disabled accounts and clients outside the account's networks are refused.

Status clients poll, sending the same password with every request, and an Argon2 verification
costs tens of milliseconds of CPU. So a verified password is remembered for a short while, as an
HMAC (under a key that lives only in this process) of user and password -- never the password
itself. A remembered login still goes through the realm on every request, and is used only while
the account's stored password hash is the one it was verified against: disabling the account,
changing its password or its networks takes effect at once. API keys are not remembered: their
check is one indexed lookup of a SHA-256.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailrelay import metrics
from mailrelay.auth.credentials import credentialsFor
from mailrelay.auth.throttle import LoginThrottle
from mailrelay.interfaces import IMessageDelivery
from mailrelay.model import API_KEY_USER, SessionInfo

WEB_LISTENER = "web"
"""The ``SessionInfo.listener`` of logins over HTTP."""

log = Logger()


class Unauthenticated(Exception):
    """No credentials, or credentials that did not log in: answer 401."""


class Throttled(Exception):
    """The client address has failed too often: answer 429 without checking anything."""


def parseBasic(authorization: bytes | None) -> tuple[str, str] | None:
    """
    ``(user, password)`` from an ``Authorization: Basic ...`` header value (RFC 7617, UTF-8),
    or None when the header is absent, of another scheme, or malformed.
    """
    if authorization is None:
        return None
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = binascii.a2b_base64(encoded.strip(), strict_mode=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return None
    return user, password


@dataclass(frozen=True)
class _Verified:
    account: str
    passwordHash: str
    expires: float


class BasicLogin:
    """
    Logs HTTP clients in: ``await login(authorization, clientAddress)`` returns the account name
    or raises :class:`Unauthenticated` / :class:`Throttled`; other failures (the store is down)
    propagate as they are.

    ``cacheSeconds`` is how long a verified password is remembered (0: never); at most
    ``maxCached`` are, the oldest forgotten first.
    """

    def __init__(
        self,
        portal: Portal,
        throttle: LoginThrottle,
        clock: IReactorTime,
        cacheSeconds: float = 60.0,
        maxCached: int = 10_000,
    ) -> None:
        self._portal = portal
        self._throttle = throttle
        self._clock = clock
        self._cacheSeconds = cacheSeconds
        self._maxCached = maxCached
        self._cacheKey = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()

    async def login(self, authorization: bytes | None, clientAddress: str) -> str:
        """The name of the account the ``Authorization`` header value logs in as."""
        credentials = parseBasic(authorization)
        if credentials is None:
            raise Unauthenticated()
        if self._throttle.blocked(clientAddress):
            raise Throttled()
        user, password = credentials
        session = SessionInfo(client_address=clientAddress, listener=WEB_LISTENER)
        try:
            account = await self._remembered(user, password, session)
            if account is None:
                account = await self._portalLogin(user, password, session)
        except (UnauthorizedLogin, UnhandledCredentials):
            self._throttle.failed(clientAddress)
            metrics.authentications.labels("failure").inc()
            log.info("{client} failed to authenticate over HTTP", client=clientAddress)
            raise Unauthenticated() from None
        self._throttle.succeeded(clientAddress)
        metrics.authentications.labels("success").inc()
        return account

    async def _portalLogin(self, user: str, password: str, session: SessionInfo) -> str:
        loggedIn: Any = await self._portal.login(
            credentialsFor(user, password), session, IMessageDelivery
        )
        _, avatar, logout = loggedIn
        logout()
        account = avatar.account
        if user != API_KEY_USER and self._cacheSeconds > 0:
            self._remember(user, password, account.name, account.password_hash)
        return str(account.name)

    async def _remembered(self, user: str, password: str, session: SessionInfo) -> str | None:
        """The account of a recently verified password, re-checked by the realm, or None."""
        if user == API_KEY_USER or self._cacheSeconds <= 0:
            return None
        key = self._key(user, password)
        entry = self._verified.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock.seconds():
            del self._verified[key]
            return None
        realm: Any = self._portal.realm  # ours takes the account name (str) as avatar id
        try:
            _, avatar, logout = await realm.requestAvatar(entry.account, session, IMessageDelivery)
        except UnauthorizedLogin:
            self._verified.pop(key, None)
            raise
        logout()
        if not hmac.compare_digest(avatar.account.password_hash, entry.passwordHash):
            # The password changed since: verify this one afresh.
            self._verified.pop(key, None)
            return None
        return entry.account

    def _remember(self, user: str, password: str, account: str, passwordHash: str) -> None:
        key = self._key(user, password)
        self._verified.pop(key, None)
        self._verified[key] = _Verified(
            account, passwordHash, self._clock.seconds() + self._cacheSeconds
        )
        while len(self._verified) > self._maxCached:
            self._verified.popitem(last=False)

    def _key(self, user: str, password: str) -> bytes:
        message = json.dumps([user, password]).encode("utf-8")
        return hmac.new(self._cacheKey, message, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"<BasicLogin {len(self._verified)} remembered>"


def clientAddress(request: Any) -> str:
    """The client's IP address as a string ('' for a non-IP transport)."""
    return str(getattr(request.getClientAddress(), "host", "") or "")
