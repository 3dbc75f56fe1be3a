"""
The realm: turns an authenticated account name into the account's SMTP avatar.

It is also where the account's client networks are enforced, because only here are both the
account (from the store) and the client (the login's ``mind``, a SessionInfo) known.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.auth.checkers import AccountPasswordChecker, APIKeyChecker, VerifiedPasswords
from mailrelay.auth.credentials import APIKeyLogin
from mailrelay.interfaces import IStore, ISubmission
from mailrelay.model import Account, SessionInfo
from mailrelay.policy.decisions import Refusal, RefusalKind
from mailrelay.policy.limits import NetworkIndex, clientAllowed
from mailrelay.recent import RecentResult
from mailrelay.store.common import ACCOUNT_CACHE_SECONDS

Recheck = Callable[[], Deferred[Account]]
"""Whether the login that made a session still holds: fires with the account as it is now,
or fails with ``Refusal(LOGIN_WITHDRAWN)``."""
AvatarFactory = Callable[[Account, Recheck], Any]


def _noLogout() -> None:
    pass


class RememberedNetworks(RecentResult[NetworkIndex]):
    """
    The :class:`~mailrelay.policy.limits.NetworkIndex` of every account in ``store``, read
    again at most every ``seconds`` (``clock`` tells the time) -- like the rest of the account
    data, a change made with the admin command line counts within that time. Logins that
    come while it is being read wait for that one read; a failed read is not remembered.
    """

    def __init__(
        self, store: IStore, clock: IReactorTime, seconds: float = ACCOUNT_CACHE_SECONDS
    ) -> None:
        super().__init__(lambda: store.listAccounts().addCallback(NetworkIndex), clock, seconds)

    def index(self) -> Deferred[NetworkIndex]:
        """The index, as read less than ``seconds`` ago. Returns Deferred[NetworkIndex]."""
        return self.get()


@implementer(IRealm)
class SubmissionRealm:
    """Gives each login the ``ISubmission`` avatar of its account. ``clock`` tells how
    old the remembered client networks of the accounts are (relay by IP)."""

    def __init__(self, store: IStore, makeAvatar: AvatarFactory, clock: IReactorTime) -> None:
        self._store = store
        self._makeAvatar = makeAvatar
        self._networks = RememberedNetworks(store, clock)

    @inlineCallbacks
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if ISubmission not in interfaces:
            raise NotImplementedError("mailrelay's realm only makes ISubmission avatars")
        name, keyHash = (
            (avatarId.account, avatarId.keyHash)
            if isinstance(avatarId, APIKeyLogin)
            else (avatarId, None)
        )
        address = mind.client_address if isinstance(mind, SessionInfo) else None
        account = yield self._store.getAccount(name)
        if not _stillAllowed(account, address):
            raise UnauthorizedLogin()
        # A password login holds while the password does; a key login while the key does.
        passwordHash = None if keyHash is not None else account.password_hash
        recheck = partial(self._recheckLogin, name, address, keyHash, passwordHash)
        return (ISubmission, self._makeAvatar(account, recheck), _noLogout)

    @inlineCallbacks
    def networkLogin(self, session: SessionInfo) -> Any:
        """For ``auth = "network"`` listeners: ``(avatar, logout)`` of the account whose client
        networks hold the session's address, or None."""
        index = yield self._networks.index()
        account = index.accountFor(session.client_address)
        if account is None:
            return None
        recheck = partial(self._recheckNetwork, account.name, session.client_address)
        return (self._makeAvatar(account, recheck), _noLogout)

    # A session asks again now and then (see AccountSubmission): an account disabled, its
    # password changed, a key revoked or a network changed with the admin command line ends
    # the sessions open on it.

    @inlineCallbacks
    def _recheckLogin(
        self, name: str, address: str | None, keyHash: str | None, passwordHash: str | None
    ) -> Any:
        account = yield self._store.getAccount(name)
        if not _stillAllowed(account, address):
            raise _withdrawn()
        if passwordHash is not None and account.password_hash != passwordHash:
            raise _withdrawn()  # the password it logged in with was changed
        if keyHash is not None:
            key = yield self._store.findApiKey(keyHash)
            if key is None or key.account != name:
                raise _withdrawn()
        return account

    @inlineCallbacks
    def _recheckNetwork(self, name: str, address: str) -> Any:
        index = yield self._networks.index()
        account = index.accountFor(address)
        if account is None or account.name != name:
            raise _withdrawn()
        return account


def _withdrawn() -> Refusal:
    return Refusal(RefusalKind.LOGIN_WITHDRAWN)


def _stillAllowed(account: Account | None, address: str | None) -> bool:
    """Whether ``account`` exists, is enabled, and takes logins from ``address`` (None: a login
    that came from no network client, which only networks restrict)."""
    if account is None or not account.enabled:
        return False
    return address is None or clientAllowed(account, address)


def makePortal(
    store: IStore,
    makeAvatar: AvatarFactory,
    reactor: Any,
    threadpool: ThreadPool,
    rememberPasswords: float = 60.0,
    clock: IReactorTime | None = None,
) -> tuple[Portal, SubmissionRealm]:
    """A portal with the password and API-key checkers, and its realm. A verified password is
    remembered for ``rememberPasswords`` seconds (0: never; see mailrelay.auth.checkers).
    ``clock`` (default: ``reactor``) tells the time to the realm and the remembered
    passwords; ``reactor`` runs the password verifications in ``threadpool``."""
    clock = reactor if clock is None else clock
    realm = SubmissionRealm(store, makeAvatar, clock)
    verified = VerifiedPasswords(clock, seconds=rememberPasswords)
    passwords = AccountPasswordChecker(store, reactor, threadpool, verified)
    portal = Portal(realm, [passwords, APIKeyChecker(store)])
    return portal, realm
