"""
The realm: turns an authenticated account name into the account's SMTP avatar.

It is also where the account's client networks are enforced, because only here are both the
account (from the store) and the client (the login's ``mind``, a SessionInfo) known.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import inlineCallbacks
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailrelay.auth.checkers import AccountPasswordChecker, APIKeyChecker, VerifiedPasswords
from mailrelay.interfaces import IMessageDelivery, IStore
from mailrelay.model import Account, SessionInfo
from mailrelay.policy.limits import accountForNetwork, clientAllowed

AvatarFactory = Callable[[Account], Any]


def _noLogout() -> None:
    pass


@implementer(IRealm)
class SubmissionRealm:
    """Gives each login the ``IMessageDelivery`` avatar of its account."""

    def __init__(self, store: IStore, makeAvatar: AvatarFactory) -> None:
        self._store = store
        self._makeAvatar = makeAvatar

    @inlineCallbacks
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("mailrelay's realm only makes IMessageDelivery avatars")
        account = yield self._store.getAccount(avatarId)
        if account is None or not account.enabled:
            raise UnauthorizedLogin()
        if isinstance(mind, SessionInfo) and not clientAllowed(account, mind.client_address):
            raise UnauthorizedLogin()
        return (IMessageDelivery, self._makeAvatar(account), _noLogout)

    @inlineCallbacks
    def networkLogin(self, session: SessionInfo) -> Any:
        """For ``auth = "network"`` listeners: ``(avatar, logout)`` of the account whose client
        networks hold the session's address, or None."""
        accounts = yield self._store.listAccounts()
        account = accountForNetwork(accounts, session.client_address)
        if account is None:
            return None
        return (self._makeAvatar(account), _noLogout)


def makePortal(
    store: IStore,
    makeAvatar: AvatarFactory,
    reactor: Any,
    threadpool: ThreadPool,
    rememberPasswords: float = 60.0,
) -> tuple[Portal, SubmissionRealm]:
    """A portal with the password and API-key checkers, and its realm. A verified password is
    remembered for ``rememberPasswords`` seconds (0: never; see mailrelay.auth.checkers)."""
    realm = SubmissionRealm(store, makeAvatar)
    verified = VerifiedPasswords(reactor, seconds=rememberPasswords)
    passwords = AccountPasswordChecker(store, reactor, threadpool, verified)
    portal = Portal(realm, [passwords, APIKeyChecker(store)])
    return portal, realm
