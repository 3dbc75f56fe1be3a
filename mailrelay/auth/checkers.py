"""
Credential checkers: account name + password (Argon2) and ``App`` + API key (SHA-256 lookup).

Both answer with the account name as the avatar id, and both refuse disabled accounts, so the
realm only ever sees enabled accounts that proved who they are.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.auth.credentials import IAPIKey
from mailrelay.auth.secrets import hashApiKey, hashPassword, verifyPassword
from mailrelay.interfaces import IStore

# Verified against when the account does not exist, so that an unknown name costs the same time
# as a wrong password and user names cannot be probed by timing.
_DUMMY_HASH = hashPassword("mailrelay-dummy-password")


@implementer(ICredentialsChecker)
class AccountPasswordChecker:
    """Account name + password, verified against the stored Argon2 hash in a worker thread."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store: IStore, reactor: Any, threadpool: ThreadPool) -> None:
        self._store = store
        self._reactor = reactor
        self._threadpool = threadpool

    @inlineCallbacks
    def requestAvatarId(self, credentials: IUsernamePassword) -> Any:
        try:
            name = credentials.username.decode("utf-8")
            password = credentials.password.decode("utf-8")
        except UnicodeDecodeError:
            raise UnauthorizedLogin() from None
        account = yield self._store.getAccount(name)
        passwordHash = account.password_hash if account is not None else _DUMMY_HASH
        matches = yield deferToThreadPool(
            self._reactor, self._threadpool, verifyPassword, passwordHash, password
        )
        if account is None or not matches or not account.enabled:
            raise UnauthorizedLogin()
        return account.name


@implementer(ICredentialsChecker)
class APIKeyChecker:
    """
    ``App`` + API key: the key's SHA-256 names the key, and through it the account.

    The key is looked up by its hash, so no comparison ever touches the key itself; what timing
    could reveal is at most a prefix of a SHA-256 of a 256-bit secret, which is no help to anyone.
    """

    credentialInterfaces = (IAPIKey,)

    def __init__(self, store: IStore) -> None:
        self._store = store

    @inlineCallbacks
    def requestAvatarId(self, credentials: IAPIKey) -> Any:
        keyHash = hashApiKey(credentials.key)
        apiKey = yield self._store.findApiKey(keyHash)
        if apiKey is None:
            raise UnauthorizedLogin()
        account = yield self._store.getAccount(apiKey.account)
        if account is None or not account.enabled:
            raise UnauthorizedLogin()
        return account.name
