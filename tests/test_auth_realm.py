"""
Tests for mailrelay.auth.realm's relay by IP: the accounts' networks are read from the real
SQLite store at most once a second, however many clients connect.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailrelay.auth.credentials import APIKeyLogin
from mailrelay.auth.realm import RememberedNetworks, SubmissionRealm
from mailrelay.auth.secrets import newApiKey
from mailrelay.interfaces import ISubmission, StoreError
from mailrelay.model import Account, SessionInfo
from mailrelay.policy.decisions import Refusal
from mailrelay.smtp.refusals import replyFor
from mailrelay.smtp.replies import LOGIN_WITHDRAWN
from mailrelay.store.sqlite import SQLiteStore
from tests.smtp_fixture import PASSWORD_HASH


class CountingStore(SQLiteStore):
    """The SQLite store, counting how often the whole account list is read."""

    listed = 0

    def listAccounts(self) -> Deferred[list[Account]]:
        self.listed += 1
        return super().listAccounts()


class RealmTestsBase(TestCase):
    """A real SQLite store with account ``erp`` (networks 10.1.0.0/16) and ``other``."""

    async def setUp(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        self.store = CountingStore(directory / "mailrelay.sqlite3", reactor)
        await self.store.open()
        self.addCleanup(self.store.close)
        self.erp = await self.withNetworks(await self.store.addAccount("erp", PASSWORD_HASH))
        await self.store.addAccount("other", PASSWORD_HASH)
        self.clock = Clock()
        self.networks = RememberedNetworks(self.store, self.clock)

    async def withNetworks(self, account: Account, *networks: str) -> Account:
        changed = replace(account, networks=networks or ("10.1.0.0/16",))
        await self.store.updateAccount(changed)
        return changed

    async def accountFor(self, ip: str) -> Any:
        index = await self.networks.index()
        return index.accountFor(ip)


class RememberedNetworksTests(RealmTestsBase):
    async def test_readAtMostOnceASecond(self) -> None:
        for _ in range(20):
            self.assertEqual(await self.accountFor("10.1.2.3"), self.erp)
        self.assertEqual(self.store.listed, 1)
        # A change (as by the admin command line) counts within a second.
        moved = await self.withNetworks(self.erp, "192.0.2.0/24")
        self.clock.advance(0.9)
        self.assertEqual(await self.accountFor("10.1.2.3"), self.erp)
        self.clock.advance(0.1)
        self.assertIsNone(await self.accountFor("10.1.2.3"))
        self.assertEqual(await self.accountFor("192.0.2.1"), moved)
        self.assertEqual(self.store.listed, 2)

    async def test_concurrentLoginsShareOneRead(self) -> None:
        waiting = [self.networks.index() for _ in range(5)]
        self.assertFalse(any(d.called for d in waiting))  # the store answers from its thread
        indexes = [await d for d in waiting]
        self.assertEqual(len({id(index) for index in indexes}), 1)
        self.assertEqual(self.store.listed, 1)

    async def test_failedReadNotRemembered(self) -> None:
        await self.store.close()
        for _ in range(2):
            with self.assertRaises(StoreError):
                await self.networks.index()
        self.assertEqual(self.store.listed, 2)

    async def test_networkLogin(self) -> None:
        realm = SubmissionRealm(self.store, lambda account, _: ("avatar of", account), self.clock)
        avatar, logout = await realm.networkLogin(SessionInfo("10.1.9.9", "network"))
        self.assertEqual(avatar, ("avatar of", self.erp))
        logout()
        self.assertIsNone(await realm.networkLogin(SessionInfo("198.51.100.7", "network")))


class LoginRecheckTests(RealmTestsBase):
    """An open session asks the realm now and then whether its login still holds."""

    async def setUp(self) -> None:
        await super().setUp()
        self.realm = SubmissionRealm(self.store, lambda account, recheck: recheck, self.clock)

    async def login(self, avatarId: Any, address: str = "10.1.9.9") -> Any:
        _, recheck, _ = await self.realm.requestAvatar(
            avatarId, SessionInfo(address, "relay.test"), ISubmission
        )
        return recheck

    async def assertWithdrawn(self, recheck: Any) -> None:
        with self.assertRaises(Refusal) as caught:
            await recheck()
        self.assertEqual(replyFor(caught.exception), LOGIN_WITHDRAWN)

    async def test_passwordLogin(self) -> None:
        recheck = await self.login("erp")
        self.assertEqual(await recheck(), self.erp)
        changed = replace(self.erp, max_message_size=1000)
        await self.store.updateAccount(changed)
        self.assertEqual(await recheck(), changed)  # the account as it is now
        await self.store.updateAccount(replace(changed, enabled=False))
        await self.assertWithdrawn(recheck)

    async def test_passwordChanged(self) -> None:
        """A session opened with the old password ends; one opened with a key does not."""
        keyId, _, keyHash = newApiKey()
        await self.store.addApiKey("erp", keyId, keyHash)
        byPassword = await self.login("erp")
        byKey = await self.login(APIKeyLogin("erp", keyHash))
        changed = replace(self.erp, password_hash="$argon2id$another")
        await self.store.updateAccount(changed)
        await self.assertWithdrawn(byPassword)
        self.assertEqual(await byKey(), changed)

    async def test_networksChanged(self) -> None:
        recheck = await self.login("erp")
        await self.withNetworks(self.erp, "192.0.2.0/24")
        await self.assertWithdrawn(recheck)

    async def test_apiKeyRevoked(self) -> None:
        keyId, _, keyHash = newApiKey()
        await self.store.addApiKey("erp", keyId, keyHash)
        recheck = await self.login(APIKeyLogin("erp", keyHash))
        self.assertEqual(await recheck(), self.erp)
        await self.store.revokeApiKey("erp", keyId)
        await self.assertWithdrawn(recheck)

    async def test_networkLoginMoved(self) -> None:
        recheck, _ = await self.realm.networkLogin(SessionInfo("10.1.9.9", "network"))
        self.assertEqual(await recheck(), self.erp)
        await self.withNetworks(self.erp, "192.0.2.0/24")
        self.clock.advance(1)  # the remembered networks are read again
        await self.assertWithdrawn(recheck)
