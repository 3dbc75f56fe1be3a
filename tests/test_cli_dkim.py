"""
Tests for ``mailrelay dkim ...``: a generated key is stored, listed (never its private half)
and removed; the DNS record ``dkim generate`` prints verifies what the relay signs with it.
"""

from __future__ import annotations

import base64
import re

import dkim
from twisted.internet.defer import gatherResults

from mailrelay.message.dkim import sign
from mailrelay.model import DkimKey, utcnow
from tests.test_cli import CLITestsBase, Result

MESSAGE = (
    b"From: App <app@example.com>\r\n"
    b"To: name1@customer.com\r\n"
    b"Subject: Your order\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Shipped today.\r\n"
)


def printedRecord(result: Result) -> tuple[str, str]:
    """The TXT record's name and value as ``dkim generate`` printed them."""
    fields = {}
    for line in result.out.splitlines():
        key, _, value = line.partition(":")
        if key in ("name", "value"):
            fields[key] = value.strip()
    return fields["name"], fields["value"]


class DkimTests(CLITestsBase):
    async def storedKey(self, domain: str) -> DkimKey:
        key = await (await self.openStore()).getDkimKey(domain)
        assert key is not None
        return key

    def assertVerifies(self, key: DkimKey, name: str, value: str) -> None:
        """A message signed with ``key`` verifies against the TXT record ``name``/``value``,
        and fails against another record."""
        signed = sign(MESSAGE, key, timestamp=int(utcnow().timestamp()))
        asked = []

        def dnsfunc(domain: bytes, timeout: int = 5) -> bytes | None:
            asked.append(domain)
            return value.encode() if domain.decode().rstrip(".") == name else None

        self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc))
        self.assertEqual(asked, [f"{name}.".encode()])
        self.assertFalse(dkim.verify(signed.replace(b"Shipped", b"Lost"), dnsfunc=dnsfunc))

    def assertNoPrivateKey(self, result: Result, key: DkimKey) -> None:
        self.assertNotIn("PRIVATE", result.out)
        body = b"".join(key.private_key.splitlines()[1:-1]).decode()
        for i in range(0, len(body) - 40, 40):
            self.assertNotIn(body[i : i + 40], result.out)

    async def test_generateRsa(self) -> None:
        generated = await self.ok("dkim", "generate", "Example.COM")
        selector = "mr" + utcnow().strftime("%Y%m")
        name, value = printedRecord(generated)
        self.assertEqual(name, f"{selector}._domainkey.example.com")
        self.assertTrue(value.startswith("v=DKIM1; k=rsa; p="), value)
        # The zone-file form: quoted strings of at most 255 octets that join to the value.
        zone = [line for line in generated.out.splitlines() if " IN TXT " in line]
        self.assertEqual(len(zone), 1)
        self.assertTrue(zone[0].startswith(f"{name}. IN TXT ( "))
        strings = re.findall(r'"([^"]*)"', zone[0])
        self.assertGreater(len(strings), 1)
        self.assertTrue(all(len(s) <= 255 for s in strings))
        self.assertEqual("".join(strings), value)

        key = await self.storedKey("example.com")
        self.assertEqual((key.selector, key.algorithm), (selector, "rsa"))
        self.assertLess(abs(key.created_at.timestamp() - utcnow().timestamp()), 60)
        self.assertVerifies(key, name, value)
        self.assertNoPrivateKey(generated, key)

        listed, listedJson = await gatherResults(
            [self.ok("dkim", "list"), self.ok("dkim", "list", "--json")]
        )
        self.assertEqual(
            listed.out.splitlines()[0].split()[:3], ["DOMAIN", "SELECTOR", "ALGORITHM"]
        )
        self.assertEqual(listed.out.splitlines()[1].split()[:3], ["example.com", selector, "rsa"])
        document = listedJson.json()
        self.assertEqual(
            document,
            [
                {
                    "domain": "example.com",
                    "selector": selector,
                    "algorithm": "rsa",
                    "created_at": document[0]["created_at"],
                }
            ],
        )
        self.assertTrue(document[0]["created_at"].startswith(utcnow().strftime("%Y-%m-")))
        for result in (listed, listedJson):
            self.assertNoPrivateKey(result, key)
            self.assertNotIn(value.split("p=")[1][:40], result.out)

    async def test_generateEd25519(self) -> None:
        generated = await self.ok(
            "dkim", "generate", "bücher.example", "--selector", "s2026", "--algorithm", "ed25519"
        )
        name, value = printedRecord(generated)
        self.assertEqual(name, "s2026._domainkey.xn--bcher-kva.example")
        self.assertTrue(value.startswith("v=DKIM1; k=ed25519; p="), value)
        self.assertEqual(len(base64.b64decode(value.split("p=")[1])), 32)
        key = await self.storedKey("xn--bcher-kva.example")
        self.assertEqual(key.algorithm, "ed25519")
        self.assertVerifies(key, name, value)
        self.assertNoPrivateKey(generated, key)
        listed = await self.ok("dkim", "list", "--json")
        self.assertEqual(
            [(k["domain"], k["selector"], k["algorithm"]) for k in listed.json()],
            [("xn--bcher-kva.example", "s2026", "ed25519")],
        )

    async def test_replaceNeedsForce(self) -> None:
        await self.ok("dkim", "generate", "example.com", "--selector", "old")
        first = await self.storedKey("example.com")
        refused = await self.mailrelay("dkim", "generate", "example.com", "--selector", "new")
        self.assertOneLineError(refused, "example.com has a DKIM key already", "--force", code=1)
        self.assertEqual(await self.storedKey("example.com"), first)

        replaced = await self.ok("dkim", "generate", "example.com", "--selector", "new", "--force")
        self.assertIn("Keep old._domainkey.example.com published", replaced.out)
        second = await self.storedKey("example.com")
        self.assertEqual(second.selector, "new")
        self.assertNotEqual(second.private_key, first.private_key)
        self.assertVerifies(second, *printedRecord(replaced))

        sameSelector = await self.ok(
            "dkim", "generate", "example.com", "--selector", "new", "--force"
        )
        self.assertIn("same selector", sameSelector.out)

    async def test_remove(self) -> None:
        await self.ok("dkim", "generate", "example.com", "--algorithm", "ed25519")
        await self.ok("dkim", "generate", "example.org", "--algorithm", "ed25519")
        removed = await self.ok("dkim", "remove", "EXAMPLE.com")
        self.assertEqual(
            removed.out, "DKIM key of example.com removed; its mail is no longer signed\n"
        )
        listed = await self.ok("dkim", "list", "--json")
        self.assertEqual([k["domain"] for k in listed.json()], ["example.org"])
        again = await self.mailrelay("dkim", "remove", "example.com")
        self.assertOneLineError(again, "no DKIM key for example.com", code=1)
        await self.ok("dkim", "remove", "example.org")
        empty, emptyJson = await gatherResults(
            [self.ok("dkim", "list"), self.ok("dkim", "list", "--json")]
        )
        self.assertEqual(empty.out, "no DKIM keys\n")
        self.assertEqual(emptyJson.json(), [])

    async def test_refused(self) -> None:
        results = await gatherResults(
            [
                self.mailrelay("dkim", "generate", "localhost"),
                self.mailrelay("dkim", "generate", "exa mple.com"),
                self.mailrelay("dkim", "generate", "[192.0.2.1]"),
                self.mailrelay("dkim", "generate", "-bad.example"),
                self.mailrelay("dkim", "generate", "example.com", "--algorithm", "dsa"),
                self.mailrelay("dkim", "generate"),
                self.mailrelay("dkim", "remove", "not a domain"),
                self.mailrelay("dkim", "generate", "example.com", "--selector", "bad_selector"),
                self.mailrelay("dkim", "generate", "example.com", "--selector=-x"),
            ]
        )
        for result in results[:7]:
            self.assertOneLineError(result, code=2)
        self.assertOneLineError(results[0], "not a domain name: 'localhost'")
        self.assertOneLineError(results[4], "dsa")
        for result in results[7:]:
            self.assertOneLineError(result, "selector", code=1)
        listed = await self.ok("dkim", "list", "--json")
        self.assertEqual(listed.json(), [])


class PipeTests(CLITestsBase):
    async def test_readerGoingAwayIsNoInternalError(self) -> None:
        """``mailrelay dkim generate D | head -1``: the reader has gone when the command writes
        (here before it starts); the command says nothing about it (no "internal error"
        line), and the key is stored all the same."""
        import subprocess
        import sys

        from twisted.internet.threads import deferToThread

        from tests.relay_fixture import REPO_ROOT

        def run() -> tuple[bytes, bytes]:
            command = [sys.executable, "-m", "mailrelay.cli", "--config", str(self.config)]
            environment = {**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)}
            process = subprocess.Popen(
                [*command, "dkim", "generate", "piped.example"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=environment,
                cwd=self.directory,
            )
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()  # the reader is gone before the first line
            errors = process.stderr.read()
            return process.wait(30), errors

        status, errors = await deferToThread(run)
        self.assertNotEqual(status, 0)
        self.assertNotIn(b"internal error", errors)
        self.assertNotIn(b"Traceback", errors)
        listed = await self.mailrelay("dkim", "list")
        self.assertIn("piped.example", listed.out)
