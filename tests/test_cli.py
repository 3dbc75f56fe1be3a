"""
Tests for the ``mailrelay`` console script, against a config file whose data_dir is in the
test's temp directory; the store is then read in-process to see what the commands wrote.

Most tests run command lines through :func:`mailrelay.cli.execute` -- everything ``main`` does
but start a new Python -- because a subprocess costs ~0.4 s of CPU; :class:`ConsoleScriptTests`
and :class:`PasswordPromptTests` run the real script as a subprocess (the latter on a pty).
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from mailrelay.auth.secrets import hashApiKey, verifyPassword
from mailrelay.cli import Console, execute
from mailrelay.model import Notification, Sender
from mailrelay.status import statusDocument
from mailrelay.store.sqlite import SQLiteStore
from tests.store_mixin import ALICE, PHONE, T0

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """What one run of the console script did."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class _Run(ProcessProtocol):
    def __init__(self, stdin: bytes, done: Deferred[Result]) -> None:
        self.stdin = stdin
        self.done = done
        self.out = b""
        self.err = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode
        self.done.callback(Result(code, self.out.decode(), self.err.decode()))


class CLITestsBase(TestCase):
    """Runs ``mailrelay --config <temp config> ...`` in-process or as a subprocess."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir(parents=True)
        self.dataDir = self.directory / "data"
        self.config = self.writeConfig(f'data_dir = "{self.dataDir}"\n')

    def writeConfig(self, text: str, name: str = "mailrelay.toml") -> Path:
        path = self.directory / name
        path.write_text(text)
        return path

    def mailrelay(
        self, *args: str, stdin: bytes = b"", config: Path | None = None
    ) -> Deferred[Result]:
        """Run a command line in this process, as the console script would."""
        console = Console(io.StringIO(), io.StringIO(), io.StringIO(stdin.decode()))
        argv = ["--config", str(config or self.config), *args]

        async def run() -> Result:
            code = await execute(reactor, argv, console)
            assert isinstance(console.out, io.StringIO) and isinstance(console.err, io.StringIO)
            return Result(code, console.out.getvalue(), console.err.getvalue())

        return Deferred.fromCoroutine(run())

    def subprocess(
        self,
        *args: str,
        stdin: bytes = b"",
        config: Path | bool | None = True,
        cwd: Path | None = None,
    ) -> Deferred[Result]:
        """Run ``python -m mailrelay.cli`` with a command line, in ``cwd`` (default: the
        config's directory). ``config``: a config file, True for the test's, None for no
        ``--config``."""
        done: Deferred[Result] = Deferred()
        argv = [sys.executable, "-m", "mailrelay.cli"]
        if config is not None:
            argv += ["--config", str(self.config if config is True else config)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        reactor.spawnProcess(
            _Run(stdin, done),
            sys.executable,
            [*argv, *args],
            env=env,
            path=str(cwd or self.directory),
        )
        return done

    def ok(self, *args: str, stdin: bytes = b"") -> Deferred[Result]:
        """Run a command that must succeed quietly on stderr."""

        def check(result: Result) -> Result:
            self.assertEqual((result.code, result.err), (0, ""), args)
            return result

        return self.mailrelay(*args, stdin=stdin).addCallback(check)

    def assertOneLineError(self, result: Result, *words: str, code: int | None = None) -> None:
        self.assertNotEqual(result.code, 0, result)
        if code is not None:
            self.assertEqual(result.code, code, result)
        self.assertEqual(result.out, "", result)
        self.assertTrue(result.err.startswith("mailrelay: "), result)
        self.assertTrue(result.err.endswith("\n"), result)
        self.assertEqual(result.err.count("\n"), 1, result)
        for word in words:
            self.assertIn(word, result.err)

    async def openStore(self) -> SQLiteStore:
        self.dataDir.mkdir(mode=0o700, exist_ok=True)
        store = SQLiteStore(self.dataDir / "mailrelay.sqlite3", reactor)
        await store.open()
        self.addCleanup(store.close)
        return store

    async def addAccount(self, name: str = "acme", password: str = "s3cret pass") -> None:
        result = await self.ok(
            "account", "add", name, "--password-stdin", stdin=f"{password}\n".encode()
        )
        self.assertEqual(result.out, f"account {name} added\n")


class AccountTests(CLITestsBase):
    async def test_addStoresArgon2Hash(self) -> None:
        await self.addAccount(password="s3cret pass")
        store = await self.openStore()
        account = await store.getAccount("acme")
        self.assertTrue(account.password_hash.startswith("$argon2id$"))
        self.assertTrue(verifyPassword(account.password_hash, "s3cret pass"))
        self.assertFalse(verifyPassword(account.password_hash, "s3cret pass\n"))
        self.assertTrue(account.enabled)
        self.assertEqual(fileMode(self.dataDir), 0o700)

    async def test_changePassword(self) -> None:
        await self.addAccount(password="old pass")
        result = await self.ok(
            "account", "password", "acme", "--password-stdin", stdin=b"new pass\n"
        )
        self.assertIn("password of account acme changed", result.out)
        store = await self.openStore()
        account = await store.getAccount("acme")
        self.assertTrue(verifyPassword(account.password_hash, "new pass"))
        self.assertFalse(verifyPassword(account.password_hash, "old pass"))
        unknown, empty = await gatherResults(
            [
                self.mailrelay("account", "password", "nobody", "--password-stdin", stdin=b"x\n"),
                self.mailrelay("account", "password", "acme", "--password-stdin", stdin=b"\n"),
            ]
        )
        self.assertOneLineError(unknown, "unknown account", code=1)
        self.assertOneLineError(empty, "empty password", code=1)

    async def test_addRefused(self) -> None:
        await self.addAccount()
        again, reserved, badName, empty = await gatherResults(
            [
                self.mailrelay("account", "add", "acme", "--password-stdin", stdin=b"x\n"),
                self.mailrelay("account", "add", "App", "--password-stdin", stdin=b"x\n"),
                self.mailrelay("account", "add", "a/b", "--password-stdin", stdin=b"x\n"),
                self.mailrelay("account", "add", "other", "--password-stdin", stdin=b"\n"),
            ]
        )
        self.assertOneLineError(again, "acme exists already", code=1)
        self.assertOneLineError(reserved, "reserved", code=2)
        self.assertOneLineError(badName, "invalid account name", code=2)
        self.assertOneLineError(empty, "empty password", code=1)

    async def test_listShowNeverShowHash(self) -> None:
        await self.addAccount("acme")
        await self.addAccount("beta")
        store = await self.openStore()
        passwordHash = (await store.getAccount("acme")).password_hash
        listed, listedJson, shown, shownJson = await gatherResults(
            [
                self.ok("account", "list"),
                self.ok("account", "list", "--json"),
                self.ok("account", "show", "acme"),
                self.ok("account", "show", "acme", "--json"),
            ]
        )
        self.assertEqual(
            listed.out.splitlines(),
            ["NAME  STATUS   SMS", "acme  enabled  off", "beta  enabled  off"],
        )
        self.assertEqual([a["name"] for a in listedJson.json()], ["acme", "beta"])
        self.assertIn("rate_per_second:       none", shown.out)
        self.assertEqual(
            shownJson.json(),
            {
                "name": "acme",
                "enabled": True,
                "sms_enabled": False,
                "sms_segments": 1,
                "rate_per_second": None,
                "daily_quota": None,
                "networks": [],
                "require_alternative": False,
                "require_rcpt_headers": False,
                "attachments": "allow",
                "max_message_size": None,
                "max_recipients": None,
                "bounces": True,
                "sms_credits": None,
            },
        )
        for result in (listed, listedJson, shown, shownJson):
            self.assertNotIn(passwordHash, result.out)
            self.assertNotIn("argon2", result.out)

    async def test_setDisableEnable(self) -> None:
        await self.addAccount()
        await self.ok(
            "account", "set", "acme",
            "--sms", "on", "--sms-segments", "3", "--rate", "10/s", "--daily-quota", "5000",
            "--networks", "192.0.2.7/24, 2001:db8::/32", "--require-alternative", "on",
            "--require-rcpt-headers", "on", "--attachments", "strip",
            "--max-message-size", "1048576", "--max-recipients", "50", "--bounces", "off",
            "--sms-credits", "0",
        )  # fmt: skip
        await self.ok("account", "disable", "acme")
        settings = (await self.ok("account", "show", "acme", "--json")).json()
        self.assertEqual(
            settings,
            {
                "name": "acme",
                "enabled": False,
                "sms_enabled": True,
                "sms_segments": 3,
                "rate_per_second": 10.0,
                "daily_quota": 5000,
                "networks": ["192.0.2.0/24", "2001:db8::/32"],
                "require_alternative": True,
                "require_rcpt_headers": True,
                "attachments": "strip",
                "max_message_size": 1048576,
                "max_recipients": 50,
                "bounces": False,
                "sms_credits": 0,
            },
        )
        await self.ok("account", "enable", "acme")
        shown = await self.ok("account", "show", "acme")
        self.assertIn("bounces:               off", shown.out)
        await self.ok(
            "account", "set", "acme", "--networks", "none", "--rate", "none", "--sms", "off",
            "--bounces", "on",
        )  # fmt: skip
        store = await self.openStore()
        account = await store.getAccount("acme")
        self.assertEqual(
            (account.enabled, account.networks, account.rate_per_second, account.sms_enabled),
            (True, (), None, False),
        )
        self.assertTrue(account.bounces)
        self.assertEqual(account.daily_quota, 5000)  # untouched

    async def test_setRefused(self) -> None:
        await self.addAccount()
        results = await gatherResults(
            [
                self.mailrelay("account", "set", "acme", "--networks", "10.0.0.0/8,300.1.2.3/8"),
                self.mailrelay("account", "set", "acme", "--rate", "10"),
                self.mailrelay("account", "set", "acme", "--sms", "yes"),
                self.mailrelay("account", "set", "acme", "--max-recipients", "0"),
                self.mailrelay("account", "set", "acme", "--attachments", "zip"),
                self.mailrelay("account", "set", "acme", "--bounces", "no"),
                self.mailrelay("account", "set", "acme"),
                self.mailrelay("account", "set", "nobody", "--sms", "on"),
                self.mailrelay("account", "show", "nobody"),
                self.mailrelay("account", "disable", "nobody"),
            ]
        )
        words = [
            "300.1.2.3/8", "10/s", "on or off", "greater than 0", "zip", "on or off",
            "nothing to set",
        ]  # fmt: skip
        for result, word in zip(results, words, strict=False):
            self.assertOneLineError(result, word)
        for result in results[-3:]:
            self.assertOneLineError(result, "unknown account: nobody", code=1)
        settings = (await self.ok("account", "show", "acme", "--json")).json()
        self.assertEqual(settings["networks"], [])


class ApiKeyTests(CLITestsBase):
    async def test_createListRevoke(self) -> None:
        await self.addAccount()
        created = await self.ok("apikey", "create", "acme")
        key = created.out.strip()
        self.assertEqual(created.out.count("\n"), 1)
        self.assertTrue(key.startswith("mr_"))
        store = await self.openStore()
        found = await store.findApiKey(hashApiKey(key))
        self.assertEqual(found.account, "acme")
        self.assertIn(found.key_id, key)

        listed, listedJson = await gatherResults(
            [self.ok("apikey", "list", "acme"), self.ok("apikey", "list", "acme", "--json")]
        )
        self.assertIn(found.key_id, listed.out)
        self.assertEqual([k["key_id"] for k in listedJson.json()], [found.key_id])
        for result in (listed, listedJson):
            self.assertNotIn(hashApiKey(key), result.out)
            self.assertNotIn(key, result.out)

        revoked = await self.ok("apikey", "revoke", "acme", found.key_id)
        self.assertIn(found.key_id, revoked.out)
        # A fresh store: a running one sees other processes' changes within a second.
        store = await self.openStore()
        self.assertIsNone(await store.findApiKey(hashApiKey(key)))
        again, listedAfter, unknown, unknownList = await gatherResults(
            [
                self.mailrelay("apikey", "revoke", "acme", found.key_id),
                self.ok("apikey", "list", "acme", "--json"),
                self.mailrelay("apikey", "create", "nobody"),
                self.mailrelay("apikey", "list", "nobody"),
            ]
        )
        self.assertOneLineError(again, "no active API key", code=1)
        self.assertEqual(listedAfter.json(), [])
        self.assertOneLineError(unknown, "unknown account: nobody", code=1)
        self.assertOneLineError(unknownList, "unknown account: nobody", code=1)


class SenderTests(CLITestsBase):
    async def test_addListRemove(self) -> None:
        await self.addAccount()
        for value in ("Example.COM", "Info@Bücher.DE", "+4477331234567", "InfoSMS", "12345"):
            await self.ok("sender", "add", "acme", value)
        store = await self.openStore()
        self.assertEqual(
            await store.listSenders("acme"),
            [
                Sender("acme", "+4477331234567", "sms"),
                Sender("acme", "12345", "sms"),
                Sender("acme", "Info@xn--bcher-kva.de", "address"),
                Sender("acme", "InfoSMS", "sms"),
                Sender("acme", "example.com", "domain"),
            ],
        )
        listed, listedJson = await gatherResults(
            [self.ok("sender", "list", "acme"), self.ok("sender", "list", "acme", "--json")]
        )
        self.assertIn("example.com", listed.out)
        self.assertEqual(listedJson.json()[-1], {"value": "example.com", "kind": "domain"})

        await self.ok("sender", "remove", "acme", "EXAMPLE.com")
        store = await self.openStore()
        self.assertNotIn("example.com", [s.value for s in await store.listSenders("acme")])

    async def test_refused(self) -> None:
        await self.addAccount()
        await self.ok("sender", "add", "acme", "example.com")
        results = await gatherResults(
            [
                self.mailrelay("sender", "add", "acme", "not_a_sender"),
                self.mailrelay("sender", "add", "acme", "TwelveChars1"),
                self.mailrelay("sender", "add", "acme", "+12345678901234567"),
                self.mailrelay("sender", "add", "acme", "bad@"),
                self.mailrelay("sender", "add", "acme", "Example.com"),
                self.mailrelay("sender", "add", "nobody", "example.com"),
                self.mailrelay("sender", "remove", "acme", "other.example"),
                self.mailrelay("sender", "list", "nobody"),
            ]
        )
        for result in results[:4]:
            self.assertOneLineError(result, code=2)
        self.assertOneLineError(results[4], "registered to acme already", code=1)
        self.assertOneLineError(results[5], "unknown account: nobody", code=1)
        self.assertOneLineError(results[6], "not registered", code=1)
        self.assertOneLineError(results[7], "unknown account: nobody", code=1)


class StatusAndQueueTests(CLITestsBase):
    async def test_statusAndQueueStats(self) -> None:
        store = await self.openStore()
        notification = Notification(
            notification_id=store.nextNotificationId(),
            account="acme",
            sender="app@acme.example",
            recipients=(ALICE, PHONE),
            size=10,
            received_at=T0,
        )
        await store.enqueue(notification, b"body")
        nid = notification.notification_id
        unknownId = store.nextNotificationId()
        human, document, stats, statsJson, unknown, unknownJson = await gatherResults(
            [
                self.ok("status", nid),
                self.ok("status", nid, "--json"),
                self.ok("queue", "stats"),
                self.ok("queue", "stats", "--json"),
                self.mailrelay("status", unknownId),
                self.mailrelay("status", unknownId, "--json"),
            ]
        )
        self.assertEqual(document.json(), statusDocument(nid, await store.statusTrail(nid)))
        self.assertEqual(
            human.out.splitlines()[1].split(),
            [
                "2015-03-08",
                "14:58:30.252",
                "email:name1@customer.com",
                "CAAS_RECEIVED",
                "Successful",
            ],
        )
        self.assertIn("sms:+4477331234567", human.out)
        self.assertEqual(statsJson.json(), {"queued": 1, "deferred": 0, "in_flight": 0, "held": 0})
        self.assertIn("queued:", stats.out)
        self.assertOneLineError(unknown, unknownId, code=1)
        # With --json: the HTTP API's document for an unknown id, and the same exit status.
        self.assertEqual(
            unknownJson.json(), {"SAPnotification": {"notificationId": unknownId, "status": []}}
        )
        self.assertEqual(unknownJson.code, 1)
        self.assertEqual(
            unknownJson.err,
            f"mailrelay: no status for notification {unknownId} (unknown or expired)\n",
        )


class ConfigTests(CLITestsBase):
    async def test_configErrors(self) -> None:
        badKey = self.writeConfig('data_dir = "x"\ncolour = "blue"\n', "bad.toml")
        # A Redis store where no server listens (port 1): the error names the address.
        redis = self.writeConfig(
            f'data_dir = "{self.dataDir}"\n[store]\nbackend = "redis"\n'
            'redis_url = "redis://127.0.0.1:1/0"\n',
            "redis.toml",
        )
        notToml = self.writeConfig("this is = = not toml", "garbage.toml")
        results = await gatherResults(
            [
                self.mailrelay("queue", "stats", config=self.directory / "missing.toml"),
                self.mailrelay("queue", "stats", config=badKey),
                self.mailrelay("queue", "stats", config=redis),
                self.mailrelay("queue", "stats", config=notToml),
                self.mailrelay("nonsense"),
                self.mailrelay("account"),
            ]
        )
        self.assertOneLineError(results[0], "missing.toml", code=1)
        self.assertOneLineError(results[1], "colour", code=1)
        self.assertOneLineError(results[2], "127.0.0.1:1", code=1)
        self.assertOneLineError(results[3], "not valid TOML", code=1)
        self.assertOneLineError(results[4], "nonsense", code=2)
        self.assertOneLineError(results[5], code=2)

    async def test_rootRefusedInTheRelaysDataDir(self) -> None:
        """Run as root against a data_dir the relay's user owns, a command would make files
        the relay cannot write: it refuses, naming the user to run it as."""
        if os.geteuid() != 0:
            raise SkipTest("needs root")
        self.dataDir.mkdir()
        os.chown(self.dataDir, 65534, 65534)
        result = await self.mailrelay("account", "list")
        self.assertOneLineError(result, "belongs to", "sudo -u", code=1)
        self.assertEqual(list(self.dataDir.iterdir()), [])
        os.chown(self.dataDir, 0, 0)
        await self.addAccount()
        await self.ok("account", "list")

    async def test_listingRefusesToMakeAStore(self) -> None:
        """Run from a directory without the relay's config, a listing command would make an
        empty store and say "no accounts": it refuses instead, naming the config and data_dir
        it used; nothing is made. ``account add`` does make the store."""
        elsewhere = self.directory / "elsewhere"
        elsewhere.mkdir()
        results = await gatherResults(
            [
                self.subprocess("account", "list", cwd=elsewhere, config=None),
                self.subprocess("queue", "stats", "--json", cwd=elsewhere, config=None),
                self.mailrelay("account", "show", "acme"),
                self.mailrelay("status", "1234"),
                self.mailrelay("account", "disable", "acme"),
            ]
        )
        defaults = results[0]
        self.assertOneLineError(defaults, "no store at", code=1)
        self.assertIn(f"{elsewhere}/mailrelay-data/mailrelay.sqlite3", defaults.err)
        self.assertIn(f"no mailrelay.toml in {elsewhere}", defaults.err)
        self.assertIn("data_dir './mailrelay-data'", defaults.err)
        self.assertOneLineError(results[1], "no store at", code=1)
        for result in results[2:]:
            self.assertOneLineError(result, f"config {self.config}", str(self.dataDir), code=1)
        self.assertEqual(sorted(os.listdir(elsewhere)), [])
        self.assertFalse(self.dataDir.exists())

        await self.addAccount()
        self.assertIn("acme", (await self.ok("account", "list")).out)

    async def test_corruptDatabase(self) -> None:
        self.dataDir.mkdir()
        (self.dataDir / "mailrelay.sqlite3").write_bytes(b"garbage " * 1000)
        result = await self.mailrelay("account", "list")
        self.assertOneLineError(result, "sqlite", code=1)


class ConsoleTests(TestCase):
    def test_tableShowsControlCharactersEscaped(self) -> None:
        """A value a client stored (a recipient, say) cannot send escape sequences to the
        operator's terminal through a listing."""
        out = io.StringIO()
        Console(out, io.StringIO(), io.StringIO()).printTable(
            [("RECIPIENT", "STATUS"), ("email:x\x1b[31m@example.org\x9b", "CAAS_RECEIVED")]
        )
        self.assertEqual(
            out.getvalue().splitlines()[1],
            "email:x\\x1b[31m@example.org\\x9b  CAAS_RECEIVED",
        )


class ConsoleScriptTests(CLITestsBase):
    """The real console script: output, JSON, exit statuses and one-line errors."""

    async def test_script(self) -> None:
        added = await self.subprocess("account", "add", "acme", "--password-stdin", stdin=b"pw\n")
        self.assertEqual((added.code, added.out, added.err), (0, "account acme added\n", ""))
        shown, unknown, badNetwork = await gatherResults(
            [
                self.subprocess("account", "show", "acme", "--json"),
                self.subprocess("account", "show", "nobody"),
                self.subprocess("account", "set", "acme", "--networks", "10.0.0.0/33"),
            ]
        )
        self.assertEqual((shown.code, shown.err), (0, ""))
        self.assertEqual(shown.json()["name"], "acme")
        self.assertNotIn("password", shown.out)
        self.assertOneLineError(unknown, "unknown account: nobody", code=1)
        self.assertOneLineError(badNetwork, "10.0.0.0/33", code=2)


class PasswordPromptTests(CLITestsBase):
    """Without --password-stdin the password is asked twice on the terminal, never echoed."""

    def prompted(self, *answers: bytes) -> Deferred[Result]:
        done: Deferred[Result] = Deferred()
        argv = [sys.executable, "-m", "mailrelay.cli", "--config", str(self.config)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        protocol = _Prompted(answers, done)
        reactor.spawnProcess(
            protocol, sys.executable, [*argv, "account", "add", "acme"], env=env, usePTY=True
        )
        return done

    async def test_prompt(self) -> None:
        result = await self.prompted(b"pty secret\n", b"pty secret\n")
        self.assertEqual(result.code, 0, result)
        self.assertIn("Password:", result.out)
        self.assertIn("Repeat password:", result.out)
        self.assertNotIn("pty secret", result.out)
        self.assertIn("account acme added", result.out)
        store = await self.openStore()
        account = await store.getAccount("acme")
        self.assertTrue(verifyPassword(account.password_hash, "pty secret"))

    async def test_mismatch(self) -> None:
        console = _Answers(["one", "two"])
        code = await execute(
            reactor, ["--config", str(self.config), "account", "add", "acme"], console
        )
        self.assertEqual(code, 1)
        self.assertEqual(console.err.getvalue(), "mailrelay: the passwords do not match\n")
        self.assertFalse((self.dataDir / "mailrelay.sqlite3").exists())


class _Answers(Console):
    """A console whose terminal answers the password prompts from a list."""

    def __init__(self, answers: list[str]) -> None:
        super().__init__(io.StringIO(), io.StringIO(), io.StringIO())
        self.answers = answers

    def askPassword(self, prompt: str) -> str:
        return self.answers.pop(0)


class _Prompted(ProcessProtocol):
    """Answers each prompt (text ending in ': ') with the next answer."""

    def __init__(self, answers: tuple[bytes, ...], done: Deferred[Result]) -> None:
        self.answers = list(answers)
        self.done = done
        self.out = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.out += data
        if self.out.endswith(b": ") and self.answers:
            assert self.transport is not None
            self.transport.write(self.answers.pop(0))

    def processEnded(self, reason: Failure) -> None:
        self.done.callback(Result(reason.value.exitCode, self.out.decode(), ""))


def fileMode(path: Path) -> int:
    return path.stat().st_mode & 0o777


class ReportsCommandTests(CLITestsBase):
    """``account webhook-secret`` and ``reports list`` (SPEC §8.4)."""

    async def secretsInStore(self) -> tuple[str, ...]:
        """The account's secrets as a store opened now reads them (none remembered)."""
        return tuple(await (await self.openStore()).webhookSecrets("acme"))

    async def test_webhookSecretMadeOnceThenRotated(self) -> None:
        from standardwebhooks import Webhook

        from mailrelay.delivery.reports import signatureHeaders

        await self.addAccount()
        made = await self.ok("account", "webhook-secret", "acme")
        (first,) = made.out.splitlines()
        self.assertTrue(first.startswith("whsec_"), made.out)
        self.assertEqual((await self.ok("account", "webhook-secret", "acme")).out, made.out)
        self.assertEqual(await self.secretsInStore(), (first,))

        rotated = await self.ok("account", "webhook-secret", "acme", "--rotate")
        second = rotated.out.splitlines()[0]
        self.assertTrue(second.startswith("whsec_"), rotated.out)
        self.assertNotEqual(second, first)
        self.assertIn(first, rotated.out)  # the previous one is listed, still valid
        self.assertEqual(await self.secretsInStore(), (second, first))
        shown = await self.ok("account", "webhook-secret", "acme")
        self.assertEqual(shown.out, rotated.out)

        # Reports are signed with both: a receiver knowing either secret accepts them.
        now = int(reactor.seconds())
        body = b'{"results": []}'
        headers = signatureHeaders("msg_1", now, body, await self.secretsInStore())
        headers = {str(k): str(v) for k, v in headers.items()}
        for secret in (first, second):
            self.assertEqual(Webhook(secret).verify(body, headers), {"results": []})

        again = await self.ok("account", "webhook-secret", "acme", "--rotate")
        third = again.out.splitlines()[0]
        self.assertEqual(await self.secretsInStore(), (third, second))  # the oldest goes

    async def test_webhookSecretOfUnknownAccount(self) -> None:
        await self.openStore()
        self.assertOneLineError(
            await self.mailrelay("account", "webhook-secret", "nobody"), "nobody", code=1
        )

    async def test_reportsList(self) -> None:
        from datetime import timedelta

        from mailrelay.model import ReportAttempt
        from tests.store_mixin import pendingReport

        store = await self.openStore()
        notification = Notification(
            notification_id=store.nextNotificationId(),
            account="acme",
            sender="app@acme.example",
            recipients=(ALICE,),
            size=10,
            received_at=T0,
        )
        await store.enqueue(notification, b"body")
        nid = notification.notification_id
        await store.addEventsWithReports([], [pendingReport(notification)])
        (claim,) = await store.claimReports(10, 60)
        pair = [(claim.report.report_id, claim.lease)]
        failed = ReportAttempt(nid, "", "hooks.acme.example", 503, "retry", T0)
        await store.recordReportAttempt(pair, failed, T0)  # due again at once
        (claim,) = await store.claimReports(10, 60)
        later = T0 + timedelta(minutes=1)
        sent = ReportAttempt(nid, "", "hooks.acme.example", 200, "sent", later)
        await store.recordReportAttempt([(claim.report.report_id, claim.lease)], sent, None)

        human, document, none = await gatherResults(
            [
                self.ok("reports", "list", nid),
                self.ok("reports", "list", nid, "--json"),
                self.ok("reports", "list", store.nextNotificationId()),
            ]
        )
        reportId = claim.report.report_id
        self.assertEqual(
            document.json(),
            [
                {
                    "report": reportId,
                    "host": "hooks.acme.example",
                    "code": 503,
                    "outcome": "retry",
                    "at": "2015-03-08 14:58:30.252",
                },
                {
                    "report": reportId,
                    "host": "hooks.acme.example",
                    "code": 200,
                    "outcome": "sent",
                    "at": "2015-03-08 14:59:30.252",
                },
            ],
        )
        lines = human.out.splitlines()
        self.assertEqual(len(lines), 3, human.out)
        self.assertIn("HOST", lines[0])
        self.assertEqual(
            lines[1].split(),
            ["2015-03-08", "14:58:30.252", "hooks.acme.example", "503", "retry", reportId],
        )
        self.assertEqual(lines[2].split()[2:5], ["hooks.acme.example", "200", "sent"])
        self.assertIn("no report attempts", none.out)
