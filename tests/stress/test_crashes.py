"""
Crashes under load, with the relay as a ``twistd`` child process and clients in threads:
SIGKILL of the relay, Redis killed and paused (a private redis-server with appendfsync
always), and a full disk (a 4 MiB tmpfs as data_dir, where the machine lets us mount one).
Each asserts that every message acknowledged with a 250 is in the store afterwards, and counts
what was stored without a 250 (a 451'd message the client would send again: a duplicate).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.relay_fixture import (
    Listener,
    RelayFiles,
    RelayProcess,
    addAccount,
    freePort,
    startRedisServer,
)
from tests.stress.load import Submitters, submitOnce


def sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


class CrashTestsBase(TestCase):
    timeout = 180

    async def relayFiles(self, extra: str = "", directory: Path | None = None) -> RelayFiles:
        self.port = freePort()
        files = RelayFiles(
            directory or Path(self.mktemp()),
            [Listener("starttls", "starttls", endpoint=f"tcp:{self.port}")],
            extra=extra,
            webEndpoint=f"tcp:{freePort()}:interface=127.0.0.1",
        )
        store = files.makeStore()
        await store.open()
        try:
            await addAccount(store)
        finally:
            await store.close()
        return files

    async def startRelay(self, files: RelayFiles, name: str = "relay") -> RelayProcess:
        relay = RelayProcess(files, name)
        await deferToThread(relay.start)
        self.addCleanup(deferToThread, relay.signal, signal.SIGKILL)
        await deferToThread(relay.waitUntilServing, self.port)
        return relay

    async def storedIds(self, files: RelayFiles, acked: list[str]) -> tuple[int, int]:
        """(how many of ``acked`` the store has, how many notifications it has in all)."""
        store = files.makeStore()
        await store.open()
        try:
            found = 0
            for notificationId in acked:
                if await store.getNotification(notificationId) is not None:
                    found += 1
            stats = await store.stats()
            return found, stats.queued + stats.deferred + stats.in_flight + stats.held
        finally:
            await store.close()


class SigkillTests(CrashTestsBase):
    async def test_sigkillUnderLoad(self) -> None:
        """Eight clients submit; the relay is SIGKILLed mid-stream, twice, and restarted:
        every acknowledged message is stored."""
        files = await self.relayFiles()
        load = Submitters(self.port, files.clientContext(), count=8).start()
        for round in range(2):
            relay = await self.startRelay(files, f"relay-{round}")
            await sleep(2.0)
            await deferToThread(relay.signal, signal.SIGKILL)
        await deferToThread(load.stop)
        found, stored = await self.storedIds(files, load.acked)
        print(
            f"\nSIGKILL x2 under load: {len(load.acked)} acknowledged, {found} found after the"
            f" kills, {stored - found} stored without a 250 (in flight at the kill)"
        )
        self.assertGreater(len(load.acked), 0)
        self.assertEqual(found, len(load.acked))
        self.assertLessEqual(stored - found, 8 * 2)  # at most one in flight per client


class RedisFaultTests(CrashTestsBase):
    def startRedis(self, port: int, directory: Path) -> subprocess.Popen[bytes]:
        directory.mkdir(parents=True, exist_ok=True)
        server, _ = startRedisServer(
            self, port, "--dir", str(directory), "--appendonly", "yes", "--appendfsync", "always"
        )
        self._servers = [*getattr(self, "_servers", []), server]
        return server

    async def redisRelay(self) -> tuple[RelayFiles, int, Path]:
        redisPort = freePort()
        redisDir = Path(self.mktemp()).resolve() / "redis"
        self.startRedis(redisPort, redisDir)
        extra = f'[store]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:{redisPort}/0"\n'
        return await self.relayFiles(extra), redisPort, redisDir

    async def test_redisKilledUnderLoad(self) -> None:
        """Redis is SIGKILLed under load and restarted from its append-only file: every
        acknowledged message is there; a message sent while it is down gets a 4xx, not 250.
        (The load's own clients may see none: one whose enqueue was on its way when Redis
        died waits for it to come back, and gets 250 if it kept the message.)"""
        files, redisPort, redisDir = await self.redisRelay()
        await self.startRelay(files)
        load = Submitters(self.port, files.clientContext(), count=4).start()
        await sleep(1.5)
        server = self._servers[-1]
        server.kill()
        await deferToThread(server.wait)
        await sleep(0.5)
        whileDown = await deferToThread(submitOnce, self.port, files.clientContext())
        await sleep(1.0)
        self.startRedis(redisPort, redisDir)
        await sleep(3.0)
        await deferToThread(load.stop)
        found, stored = await self.storedIds(files, load.acked)
        print(
            f"\nRedis SIGKILL under load: {len(load.acked)} acknowledged, {found} found,"
            f" {stored - found} stored without a 250; replies {dict(load.codes)};"
            f" a message sent while it was down: {whileDown}"
        )
        self.assertEqual(found, len(load.acked))
        self.assertTrue(400 <= whileDown < 500, whileDown)

    async def test_redisPausedPastTheTimeout(self) -> None:
        """Redis is paused (SIGSTOP) for longer than the store's 10 s timeout: the clients
        waiting get 451, and when Redis resumes nothing of theirs is written (the fence), so
        what is stored is exactly what was acknowledged: no duplicates after their retries."""
        files, _, _ = await self.redisRelay()
        await self.startRelay(files)
        server = self._servers[-1]
        load = Submitters(self.port, files.clientContext(), count=4).start()
        await sleep(1.0)
        os.kill(server.pid, signal.SIGSTOP)
        await sleep(12.0)
        os.kill(server.pid, signal.SIGCONT)
        await sleep(1.5)
        await deferToThread(load.stop)
        found, stored = await self.storedIds(files, load.acked)
        print(
            f"\nRedis paused 12 s under load: {len(load.acked)} acknowledged, {found} found,"
            f" {stored - found} stored without a 250; replies {dict(load.codes)}"
        )
        self.assertEqual(found, len(load.acked))
        self.assertGreater(load.codes[451], 0)
        self.assertEqual(stored, found)


class FullDiskTests(CrashTestsBase):
    async def test_fullDiskUnderLoad(self) -> None:
        """data_dir on a 4 MiB tmpfs fills under load: clients get 4xx, never a 250 for a
        message that was not stored; every acknowledged message is there afterwards."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise SkipTest("mounting a tmpfs needs root")
        directory = Path(self.mktemp()).resolve()
        dataDir = directory / "data"
        dataDir.mkdir(parents=True)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(dataDir)],
            capture_output=True,
        )
        if mounted.returncode != 0:
            raise SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", str(dataDir)])
        files = await self.relayFiles(directory=directory)
        relay = await self.startRelay(files)
        load = Submitters(self.port, files.clientContext(), count=4).start()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not any(c >= 400 for c in load.codes):
            await sleep(0.5)
        await sleep(1.0)
        await deferToThread(load.stop)
        await deferToThread(relay.signal, signal.SIGTERM)
        found, _ = await self.storedIds(files, load.acked)
        print(
            f"\nFull disk (4 MiB tmpfs): {len(load.acked)} acknowledged, {found} found;"
            f" replies {dict(load.codes)}"
        )
        self.assertTrue(any(c >= 400 for c in load.codes), load.codes)
        self.assertEqual(found, len(load.acked))
