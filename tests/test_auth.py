"""
Tests for mailrelay.auth.checkers: the password checker and its memory of verified passwords,
with the real SQLite store and real Argon2 hashes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from mailrelay.auth.checkers import AccountPasswordChecker, VerifiedPasswords
from mailrelay.auth.secrets import hashPassword
from mailrelay.store.sqlite import SQLiteStore
from tests.smtp_fixture import PASSWORD, PASSWORD_HASH

OTHER_HASH = hashPassword("another password")


def login(name: str, password: str) -> UsernamePassword:
    return UsernamePassword(name.encode(), password.encode())


class PasswordCheckerTests(TestCase):
    async def asyncSetUp(self, seconds: float = 60.0, maxEntries: int = 100) -> None:
        self.clock = Clock()
        path = Path(self.mktemp())
        path.mkdir()
        self.store = SQLiteStore(path / "store.sqlite3", reactor)
        await self.store.open()
        self.addCleanup(self.store.close)
        await self.store.addAccount("acme", PASSWORD_HASH)
        pool = ThreadPool(minthreads=1, maxthreads=1)
        pool.start()
        self.addCleanup(pool.stop)
        self.verified = VerifiedPasswords(self.clock, seconds=seconds, maxEntries=maxEntries)
        self.checker = AccountPasswordChecker(self.store, reactor, pool, self.verified)

    async def check(self, password: str = PASSWORD, name: str = "acme") -> Any:
        return await self.checker.requestAvatarId(login(name, password))

    async def test_verifiedPasswordRemembered(self) -> None:
        await self.asyncSetUp()
        self.assertEqual(await self.check(), "acme")
        self.assertEqual(await self.check(), "acme")
        self.assertEqual(self.checker.verifications, 1)
        self.clock.advance(61)
        self.assertEqual(await self.check(), "acme")
        self.assertEqual(self.checker.verifications, 2)

    async def test_concurrentLoginsShareOneVerification(self) -> None:
        """Logins with the same password while it is verified wait for that verification (a
        remembered password expiring under a client polling on many connections); another
        password gets its own, and fails alone."""
        await self.asyncSetUp()
        same = [self.checker.requestAvatarId(login("acme", PASSWORD)) for _ in range(5)]
        wrong = [self.checker.requestAvatarId(login("acme", "wrong")) for _ in range(2)]
        self.assertEqual(await gatherResults(same), ["acme"] * 5)
        for attempt in wrong:
            with self.assertRaises(UnauthorizedLogin):
                await attempt
        self.assertEqual(self.checker.verifications, 2)
        self.clock.advance(61)  # forgotten: the next login verifies again
        self.assertEqual(await self.check(), "acme")
        self.assertEqual(self.checker.verifications, 3)

    async def test_wrongPasswordNeverRemembered(self) -> None:
        await self.asyncSetUp()
        await self.check()
        for _ in range(2):
            with self.assertRaises(UnauthorizedLogin):
                await self.check("wrong")
        self.assertEqual(self.checker.verifications, 3)

    async def test_passwordChangeForgetsTheOldOne(self) -> None:
        await self.asyncSetUp()
        await self.check()
        account = await self.store.getAccount("acme")
        await self.store.updateAccount(dataclasses.replace(account, password_hash=OTHER_HASH))
        with self.assertRaises(UnauthorizedLogin):
            await self.check()
        self.assertEqual(await self.check("another password"), "acme")

    async def test_disabledAccountRefusedEvenWhenRemembered(self) -> None:
        await self.asyncSetUp()
        await self.check()
        account = await self.store.getAccount("acme")
        await self.store.updateAccount(dataclasses.replace(account, enabled=False))
        with self.assertRaises(UnauthorizedLogin):
            await self.check()
        self.assertEqual(self.checker.verifications, 1)

    async def test_unknownAccountCostsAVerification(self) -> None:
        """An unknown name takes as long as a wrong password: no probing by timing."""
        await self.asyncSetUp()
        with self.assertRaises(UnauthorizedLogin):
            await self.check(name="nobody")
        self.assertEqual(self.checker.verifications, 1)

    async def test_rememberingOff(self) -> None:
        await self.asyncSetUp(seconds=0)
        for _ in range(2):
            await self.check()
        self.assertEqual(self.checker.verifications, 2)

    def test_boundedAndNothingSecretInRepr(self) -> None:
        verified = VerifiedPasswords(Clock(), maxEntries=2)
        for i in range(5):
            verified.remember(f"user{i}", "sekrit", "hash")
        self.assertFalse(verified.remembers("user0", "sekrit", "hash"))
        self.assertTrue(verified.remembers("user4", "sekrit", "hash"))
        self.assertNotIn("sekrit", repr(verified))
        self.assertNotIn("sekrit", repr(verified.__dict__))
