"""
Credential checkers: account name + password (Argon2) and ``App`` + API key (SHA-256 lookup).

Both answer with the account name as the avatar id, and both refuse disabled accounts, so the
realm only ever sees enabled accounts that proved who they are.

An Argon2 verification costs a large fraction of a CPU second on purpose, and clients log in
again and again with the same password (a connection per message, a status poll a second).
So a verified password is remembered for a minute by :class:`VerifiedPasswords` -- as an HMAC,
under a key that exists only in this process, of the account name, the password and the stored
hash it matched. The account is still read on every login: a disabled account or a changed
password takes effect at once, because a new hash no longer matches the remembered HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.auth.credentials import APIKeyLogin, IAPIKey
from mailrelay.auth.secrets import hashApiKey, hashPassword, verifyPassword
from mailrelay.interfaces import IStore


class VerifiedPasswords:
    """Remembers recently verified passwords (as HMACs) for ``seconds``; at most ``maxEntries``."""

    def __init__(self, clock: Any, seconds: float = 60.0, maxEntries: int = 10_000) -> None:
        self._clock = clock
        self._seconds = seconds
        self._maxEntries = maxEntries
        self._key = secrets.token_bytes(32)
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def key(self, name: str, password: str, passwordHash: str) -> bytes:
        """What stands for this name, password and hash (an HMAC under a key of this process's
        own: nothing of the password can be read back from it)."""
        return self._digest(name, password, passwordHash)

    def _digest(self, name: str, password: str, passwordHash: str) -> bytes:
        message = json.dumps([name, password, passwordHash]).encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def remembers(self, name: str, password: str, passwordHash: str) -> bool:
        """Whether this password was verified against this hash less than ``seconds`` ago."""
        digest = self._digest(name, password, passwordHash)
        expires = self._expiry.get(digest)
        if expires is None:
            return False
        if expires <= self._clock.seconds():
            del self._expiry[digest]
            return False
        return True

    def remember(self, name: str, password: str, passwordHash: str) -> None:
        if self._seconds <= 0:
            return
        digest = self._digest(name, password, passwordHash)
        self._expiry.pop(digest, None)
        self._expiry[digest] = self._clock.seconds() + self._seconds
        while len(self._expiry) > self._maxEntries:
            self._expiry.popitem(last=False)

    def __repr__(self) -> str:
        return f"<VerifiedPasswords {len(self._expiry)} remembered>"


# Verified against when the account does not exist, so that an unknown name costs the same time
# as a wrong password and user names cannot be probed by timing.
_DUMMY_HASH = hashPassword("mailrelay-dummy-password")


@implementer(ICredentialsChecker)
class AccountPasswordChecker:
    """
    Account name + password, verified against the stored Argon2 hash in a worker thread.

    Logins with the same name, password and hash while one of them is being verified wait for
    that verification rather than run their own: when a remembered password expires, every
    request of a client polling over several connections would otherwise start an Argon2 hash
    (64 MiB and tens of milliseconds each) at once, queued on the auth threads.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        store: IStore,
        reactor: Any,
        threadpool: ThreadPool,
        verified: VerifiedPasswords | None = None,
    ) -> None:
        self._store = store
        self._reactor = reactor
        self._threadpool = threadpool
        self._verified = verified or VerifiedPasswords(reactor, seconds=0)
        self.verifications = 0  # Argon2 verifications run: what the remembering saves
        self._verifying: dict[bytes, list[Deferred[bool]]] = {}

    @inlineCallbacks
    def requestAvatarId(self, credentials: IUsernamePassword) -> Any:
        try:
            name = credentials.username.decode("utf-8")
            password = credentials.password.decode("utf-8")
        except UnicodeDecodeError:
            raise UnauthorizedLogin() from None
        account = yield self._store.getAccount(name)
        if account is not None and self._verified.remembers(name, password, account.password_hash):
            if not account.enabled:
                raise UnauthorizedLogin()
            return account.name
        passwordHash = account.password_hash if account is not None else _DUMMY_HASH
        matches = yield self._verify(name, password, passwordHash)
        if account is None or not matches or not account.enabled:
            raise UnauthorizedLogin()
        self._verified.remember(name, password, account.password_hash)
        return account.name

    def _verify(self, name: str, password: str, passwordHash: str) -> Deferred[bool]:
        """Whether ``password`` matches ``passwordHash``: one verification in the thread pool
        for all who ask while it runs."""
        key = self._verified.key(name, password, passwordHash)
        waiter: Deferred[bool] = Deferred()
        waiting = self._verifying.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._verifying[key] = [waiter]
        self.verifications += 1
        verified = deferToThreadPool(
            self._reactor, self._threadpool, verifyPassword, passwordHash, password
        )
        verified.addBoth(self._verifiedFor, key)
        return waiter

    def _verifiedFor(self, result: bool | Failure, key: bytes) -> None:
        for waiter in self._verifying.pop(key):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


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
        return APIKeyLogin(account.name, keyHash)
