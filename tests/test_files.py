"""The relay's own files: private modes, atomic writes, handing data_dir to twistd --uid."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailrelay.config import parseConfig
from mailrelay.files import handOver, keepFilesPrivate, warnIfShared, writePrivately
from mailrelay.tls import SELF_SIGNED_CERT, SELF_SIGNED_KEY, certificatePaths

NOBODY = 65534


def requireRoot() -> None:
    if os.geteuid() != 0:
        raise SkipTest("changing owners needs root")


class FilesTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir()
        self.addCleanup(os.umask, os.umask(0o022))  # as most services are started


class WritePrivatelyTests(FilesTestCase):
    def test_newFile(self) -> None:
        path = self.directory / "key.pem"
        writePrivately(path, b"secret")
        self.assertEqual(path.read_bytes(), b"secret")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(os.listdir(self.directory), ["key.pem"])  # no temporary left

    def test_existingLooseFileReplaced(self) -> None:
        """A key file left readable by others is replaced by a private one, not rewritten in
        place (which would keep its mode)."""
        path = self.directory / "key.pem"
        path.write_bytes(b"old")
        path.chmod(0o644)
        writePrivately(path, b"new")
        self.assertEqual((path.read_bytes(), stat.S_IMODE(path.stat().st_mode)), (b"new", 0o600))

    def test_symbolicLinkNotFollowed(self) -> None:
        victim = self.directory / "victim"
        victim.write_bytes(b"untouched")
        path = self.directory / "key.pem"
        path.symlink_to(victim)
        writePrivately(path, b"secret")
        self.assertEqual(victim.read_bytes(), b"untouched")
        self.assertFalse(path.is_symlink())
        self.assertEqual(path.read_bytes(), b"secret")

    def test_selfSignedKeyPrivateEvenIfALooseOneWasThere(self) -> None:
        config = parseConfig({"hostname": "relay.test", "data_dir": str(self.directory)})
        (self.directory / SELF_SIGNED_KEY).write_bytes(b"stale")
        (self.directory / SELF_SIGNED_KEY).chmod(0o644)
        certPath, keyPath = certificatePaths(config)  # no certificate yet: a new pair
        self.assertEqual(stat.S_IMODE(keyPath.stat().st_mode), 0o600)
        self.assertIn(b"PRIVATE KEY", keyPath.read_bytes())
        self.assertEqual(certPath.name, SELF_SIGNED_CERT)


class PrivateModeTests(FilesTestCase):
    def test_keepFilesPrivate(self) -> None:
        keepFilesPrivate()
        path = self.directory / "database"
        path.write_bytes(b"x")
        (self.directory / "sub").mkdir()
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE((self.directory / "sub").stat().st_mode), 0o700)

    def test_warnIfShared(self) -> None:
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.directory.chmod(0o700)
        warnIfShared(self.directory)
        self.assertEqual(events, [])
        self.directory.chmod(0o755)
        warnIfShared(self.directory)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn])
        self.assertEqual(events[0]["mode"], 0o755)


class HandOverTests(FilesTestCase):
    def test_rootOwnedEntriesGoToTheUser(self) -> None:
        requireRoot()
        (self.directory / "spool").mkdir()
        (self.directory / "mailrelay.sqlite3").write_bytes(b"x")
        outside = Path(self.mktemp())
        outside.write_bytes(b"not ours")
        (self.directory / "link").symlink_to(outside)
        mine = self.directory / "already.theirs"
        mine.write_bytes(b"")
        os.chown(mine, NOBODY, NOBODY)
        self.assertEqual(handOver(self.directory, NOBODY, NOBODY), 3)
        for path in (
            self.directory,
            self.directory / "spool",
            self.directory / "mailrelay.sqlite3",
        ):
            self.assertEqual((path.stat().st_uid, path.stat().st_gid), (NOBODY, NOBODY))
        self.assertEqual(outside.stat().st_uid, 0)  # a link's target is never changed
        self.assertEqual((self.directory / "link").lstat().st_uid, 0)


class WorkerImportPathTests(FilesTestCase):
    def test_workerDoesNotImportFromItsWorkingDirectory(self) -> None:
        """Workers start as ``python -P -m mailrelay.workers.child``: a module file in the
        working directory (data_dir under the shipped unit) is not imported in its place."""
        marker = self.directory / "imported"
        (self.directory / "argparse.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        command = [sys.executable, "-P", "-m", "mailrelay.workers.child", "--help"]
        result = subprocess.run(command, cwd=self.directory, env=env, capture_output=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertFalse(marker.exists())
        subprocess.run(command[:1] + command[2:], cwd=self.directory, env=env, capture_output=True)
        self.assertTrue(marker.exists())  # without -P it would have been
