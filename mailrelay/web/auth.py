"""
HTTP Basic logins for the status API, through the same portal, realm and failure throttle as
SMTP AUTH.

A login is account name + password or ``App`` + API key (``credentialsFor`` decides), with a
:class:`~mailrelay.model.SessionInfo` of listener ``web`` as the mind, so the realm applies the
same rules as on SMTP: disabled accounts and clients outside the account's networks are refused.

Status clients poll, sending the same password with every request; the password checker
remembers a verified password for a minute (see :mod:`mailrelay.auth.checkers`), so a poll does
not cost an Argon2 verification, for HTTP and SMTP alike.
"""

from __future__ import annotations

import binascii
from typing import Any

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.logger import Logger

from mailrelay import metrics
from mailrelay.auth.credentials import credentialsFor
from mailrelay.auth.throttle import LoginThrottle
from mailrelay.interfaces import ISubmission
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


class BasicLogin:
    """
    Logs HTTP clients in: ``await login(authorization, clientAddress)`` returns the account name
    or raises :class:`Unauthenticated` / :class:`Throttled`; other failures (the store is down)
    propagate as they are.
    """

    def __init__(self, portal: Portal, throttle: LoginThrottle) -> None:
        self._portal = portal
        self._throttle = throttle

    async def login(self, authorization: bytes | None, clientAddress: str) -> str:
        """The name of the account the ``Authorization`` header value logs in as."""
        credentials = parseBasic(authorization)
        if credentials is None:
            raise Unauthenticated()
        if self._throttle.blocked(clientAddress):
            raise Throttled()
        user, password = credentials
        # Guesses at one account from many addresses (see mailrelay.auth.throttle); API-key
        # logins (user App) name no account.
        account = None if user == API_KEY_USER else user
        if account is not None and self._throttle.accountBlocked(account, clientAddress):
            raise Throttled()
        session = SessionInfo(client_address=clientAddress, listener=WEB_LISTENER)
        try:
            loggedIn: Any = await self._portal.login(
                credentialsFor(user, password), session, ISubmission
            )
        except (UnauthorizedLogin, UnhandledCredentials):
            self._throttle.failed(clientAddress, account)
            metrics.authentications.labels("failure").inc()
            log.info("{client} failed to authenticate over HTTP", client=clientAddress)
            raise Unauthenticated() from None
        _, avatar, logout = loggedIn
        logout()
        metrics.authentications.labels("success").inc()
        self._throttle.succeeded(avatar.account.name, clientAddress)
        return str(avatar.account.name)


def clientAddress(request: Any) -> str:
    """The client's IP address as a string ('' for a non-IP transport)."""
    return str(getattr(request.getClientAddress(), "host", "") or "")
