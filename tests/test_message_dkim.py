"""DKIM keys, their DNS records, and signatures that dkimpy verifies."""

import base64
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailrelay.message.dkim import DkimError, DkimSigner, dnsRecord, generateKey, sign
from mailrelay.model import DkimKey

NOW = datetime(2025, 3, 8, 14, 58, 30, tzinfo=UTC)
TIMESTAMP = int(NOW.timestamp())

MESSAGE = (
    b"Received: from client.example (client.example [192.0.2.1])\r\n"
    b"\tby relay.example.com with ESMTPA id 1; Sat, 08 Mar 2025 14:58:30 +0000\r\n"
    b'From: "Sender" <sender@example.com>\r\n'
    b"To: Recipient <r@example.org>\r\n"
    b"Cc: c@example.org\r\n"
    b"Subject: Hello there,\r\n"
    b"  folded\r\n"
    b"Date: Sat, 08 Mar 2025 14:58:30 +0000\r\n"
    b"Message-ID: <12345@relay.example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + "Grüße  with  spaces   \r\n\r\n\r\n".encode()
)

# Key generation is the slow part (RSA); one key of each kind serves every test.
_KEYS: dict[str, DkimKey] = {}


def keyFor(algorithm: Any) -> DkimKey:
    if algorithm not in _KEYS:
        _KEYS[algorithm] = generateKey("Example.COM", "sel1", algorithm, NOW)
    return _KEYS[algorithm]


def dnsFor(key: DkimKey) -> Any:
    """A dkimpy ``dnsfunc`` that answers the key's TXT record and nothing else."""
    name, text = dnsRecord(key)

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes | None:
        if qname.rstrip(b".") == name.encode():
            return text.encode()
        return None

    return dnsfunc


def signatureTags(signed: bytes) -> dict[bytes, bytes]:
    header = signed[: signed.index(b"\r\n\r\n")]
    value = header.split(b"\r\n", 1)[0]
    rest = header.split(b"\r\n")[1:]
    for line in rest:
        if line[:1] not in (b" ", b"\t"):
            break
        value += line
    assert value.startswith(b"DKIM-Signature:")
    tags = {}
    for tag in value[len(b"DKIM-Signature:") :].split(b";"):
        name, _, tagValue = tag.strip().partition(b"=")
        tags[name] = b"".join(tagValue.split())
    return tags


# The mixin's tests run only in the classes below, which add a TestCase.
_TestCase = SynchronousTestCase if TYPE_CHECKING else object


class _SigningTestsMixin(_TestCase):
    algorithm: str
    signatureAlgorithm: bytes

    def verify(self, signed: bytes, key: DkimKey) -> bool:
        if self.algorithm == "ed25519":
            try:
                import nacl  # noqa: F401 -- dkimpy verifies ed25519 with PyNaCl
            except ImportError:
                raise SkipTest("dkimpy needs PyNaCl to verify ed25519 signatures") from None
        return bool(dkim.verify(signed, dnsfunc=dnsFor(key)))

    def test_verifies(self) -> None:
        key = keyFor(self.algorithm)
        signed = sign(MESSAGE, key, timestamp=TIMESTAMP)
        self.assertTrue(signed.startswith(b"DKIM-Signature: "))
        self.assertTrue(signed.endswith(MESSAGE))
        self.assertTrue(self.verify(signed, key))

    def test_tags(self) -> None:
        tags = signatureTags(sign(MESSAGE, keyFor(self.algorithm), timestamp=TIMESTAMP))
        self.assertEqual(tags[b"a"], self.signatureAlgorithm)
        self.assertEqual(tags[b"c"], b"relaxed/relaxed")
        self.assertEqual(tags[b"d"], b"example.com")
        self.assertEqual(tags[b"s"], b"sel1")
        self.assertEqual(tags[b"t"], str(TIMESTAMP).encode())
        signedFields = tags[b"h"].split(b":")
        for name in (
            b"from",
            b"to",
            b"cc",
            b"subject",
            b"date",
            b"message-id",
            b"mime-version",
            b"content-type",
        ):
            self.assertIn(name, signedFields)
        self.assertNotIn(b"received", signedFields)

    def test_deterministic(self) -> None:
        """The same message, key and timestamp: the same bytes, whichever signer."""
        key = keyFor(self.algorithm)
        signer = DkimSigner()
        first = signer.sign(MESSAGE, key, TIMESTAMP)
        self.assertEqual(signer.sign(MESSAGE, key, TIMESTAMP), first)
        self.assertEqual(sign(MESSAGE, key, timestamp=TIMESTAMP), first)
        self.assertNotEqual(signer.sign(MESSAGE, key, TIMESTAMP + 1), first)

    def test_tamperedBodyFails(self) -> None:
        key = keyFor(self.algorithm)
        signed = sign(MESSAGE, key, timestamp=TIMESTAMP)
        self.assertFalse(self.verify(signed.replace(b"spaces", b"SPACES"), key))

    def test_relaxedSurvivesRefolding(self) -> None:
        """relaxed/relaxed: whitespace changes on the way do not break the signature."""
        key = keyFor(self.algorithm)
        signed = sign(MESSAGE, key, timestamp=TIMESTAMP)
        refolded = signed.replace(
            b"Subject: Hello there,\r\n  folded", b"Subject:  Hello there, folded"
        )
        refolded = refolded.replace(b"with  spaces   \r\n", b"with spaces\r\n")
        self.assertTrue(self.verify(refolded, key))

    def test_messageWithoutFrom(self) -> None:
        """From is signed even when absent (RFC 6376 requires it in h=); adding one breaks it."""
        key = keyFor(self.algorithm)
        message = b"Subject: x\r\n\r\nbody\r\n"
        signed = sign(message, key, timestamp=TIMESTAMP)
        self.assertIn(b"from", signatureTags(signed)[b"h"].split(b":"))
        self.assertTrue(self.verify(signed, key))
        self.assertFalse(
            self.verify(signed.replace(b"Subject", b"From: x@evil.example\r\nSubject"), key)
        )

    def test_idnDomain(self) -> None:
        key = generateKey("Bücher.de", "s", self.algorithm, NOW)  # type: ignore[arg-type]
        self.assertEqual(key.domain, "xn--bcher-kva.de")
        signed = sign(b"From: a@xn--bcher-kva.de\r\n\r\nx\r\n", key, timestamp=TIMESTAMP)
        self.assertEqual(signatureTags(signed)[b"d"], b"xn--bcher-kva.de")
        self.assertTrue(self.verify(signed, key))


class RsaSigningTests(_SigningTestsMixin, SynchronousTestCase):
    algorithm = "rsa"
    signatureAlgorithm = b"rsa-sha256"


class Ed25519SigningTests(_SigningTestsMixin, SynchronousTestCase):
    algorithm = "ed25519"
    signatureAlgorithm = b"ed25519-sha256"


class KeyTests(SynchronousTestCase):
    def test_rsaKey(self) -> None:
        key = keyFor("rsa")
        self.assertEqual((key.domain, key.selector, key.algorithm), ("example.com", "sel1", "rsa"))
        self.assertEqual(key.created_at, NOW)
        self.assertTrue(key.private_key.startswith(b"-----BEGIN PRIVATE KEY-----\n"))
        loaded = serialization.load_pem_private_key(key.private_key, password=None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        self.assertEqual(loaded.key_size, 2048)
        self.assertNotIn(b"PRIVATE", repr(key).encode())

    def test_ed25519Key(self) -> None:
        key = keyFor("ed25519")
        self.assertTrue(key.private_key.startswith(b"-----BEGIN PRIVATE KEY-----\n"))
        loaded = serialization.load_pem_private_key(key.private_key, password=None)
        self.assertIsInstance(loaded, ed25519.Ed25519PrivateKey)

    def test_rsaRecord(self) -> None:
        key = keyFor("rsa")
        name, text = dnsRecord(key)
        self.assertEqual(name, "sel1._domainkey.example.com")
        prefix = "v=DKIM1; k=rsa; p="
        self.assertTrue(text.startswith(prefix))
        public = serialization.load_der_public_key(base64.b64decode(text[len(prefix) :]))
        assert isinstance(public, rsa.RSAPublicKey)
        self.assertEqual(public.key_size, 2048)

    def test_ed25519Record(self) -> None:
        """RFC 8463: p= is the raw 32-byte public key, not a SubjectPublicKeyInfo."""
        key = keyFor("ed25519")
        name, text = dnsRecord(key)
        self.assertEqual(name, "sel1._domainkey.example.com")
        prefix = "v=DKIM1; k=ed25519; p="
        self.assertTrue(text.startswith(prefix))
        raw = base64.b64decode(text[len(prefix) :])
        self.assertEqual(len(raw), 32)
        loaded = serialization.load_pem_private_key(key.private_key, password=None)
        assert isinstance(loaded, ed25519.Ed25519PrivateKey)
        self.assertEqual(
            raw,
            loaded.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            ),
        )

    def test_badNames(self) -> None:
        for domain, selector in (
            ("example.com", "bad selector"),
            ("example.com", ""),
            ("example.com", "-x"),
            ("not a domain", "s"),
            ("localhost", "s"),
            ("[192.0.2.1]", "s"),
        ):
            with self.subTest(domain=domain, selector=selector):
                self.assertRaises(DkimError, generateKey, domain, selector, "ed25519", NOW)

    def test_badAlgorithm(self) -> None:
        self.assertRaises(DkimError, generateKey, "example.com", "s", "dsa", NOW)

    def test_selectorWithDots(self) -> None:
        key = generateKey("example.com", "2025.March", "ed25519", NOW)
        self.assertEqual(dnsRecord(key)[0], "2025.march._domainkey.example.com")


class SignerTests(SynchronousTestCase):
    def test_keyReplacedForDomain(self) -> None:
        """A new key for a domain is used at once, not the cached one."""
        signer = DkimSigner()
        old = keyFor("ed25519")
        new = generateKey("example.com", "sel2", "ed25519", NOW)
        signer.sign(MESSAGE, old, TIMESTAMP)
        signed = signer.sign(MESSAGE, new, TIMESTAMP)
        self.assertEqual(signatureTags(signed)[b"s"], b"sel2")
        self.assertEqual(signed, sign(MESSAGE, new, timestamp=TIMESTAMP))

    def test_unreadableKey(self) -> None:
        key = DkimKey("example.com", "s", "rsa", b"not a key", NOW)
        error = self.assertRaises(DkimError, sign, MESSAGE, key, timestamp=TIMESTAMP)
        self.assertNotIn("not a key", str(error))

    def test_wrongKind(self) -> None:
        key = DkimKey("example.com", "s", "rsa", keyFor("ed25519").private_key, NOW)
        self.assertRaises(DkimError, sign, MESSAGE, key, timestamp=TIMESTAMP)

    def test_malformedHeader(self) -> None:
        self.assertRaises(
            DkimError, sign, b"no header here\r\n\r\nbody", keyFor("ed25519"), timestamp=TIMESTAMP
        )

    def test_reprHidesKey(self) -> None:
        key = keyFor("ed25519")
        self.assertNotIn(key.private_key.decode(), repr(key))
