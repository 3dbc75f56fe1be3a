"""
DKIM (RFC 6376): keys for sender domains, their DNS records, and signing with dkimpy.

A signature is ``relaxed/relaxed`` with ``rsa-sha256`` (2048-bit keys) or ``ed25519-sha256``
(RFC 8463). It covers the header fields dkimpy signs by default (RFC 6376 §5.4.1's list:
From, To, Cc, Subject, Date, Message-ID, MIME-Version, Content-Type, ... as present, From
twice so none can be added), never ``Received:``.

Signing is deterministic: the same message, key and timestamp give the same bytes (RSA
PKCS#1 v1.5 and Ed25519 signatures are deterministic; ``t=`` is the caller's timestamp), so a
retry sends what the first attempt sent. dkimpy's ``DKIM.sign`` reads ``t=`` from
``time.time()`` and parses the key on every call; :class:`_Signature` is a ``dkim.DKIM``
that builds the same tag list with the given ``t=`` and a key parsed once, and leaves
canonicalisation, header selection, folding and the signature itself to dkimpy's
``gen_header``. Ed25519 keys sign through ``cryptography`` (dkimpy would need PyNaCl).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import HASH_ALGORITHMS

from mailrelay.model import DkimAlgorithm, DkimKey
from mailrelay.policy.addresses import MAX_DOMAIN, normaliseDomain

RSA_KEY_BITS = 2048
DEFAULT_SELECTOR = "mailrelay"
_CANONICALIZE = (b"relaxed", b"relaxed")
_SIGNATURE_ALGORITHMS: dict[DkimAlgorithm, bytes] = {
    "rsa": b"rsa-sha256",
    "ed25519": b"ed25519-sha256",
}
_SELECTOR = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)


class DkimError(ValueError):
    """A key or a message that cannot be used for DKIM; the text says why (never the key)."""


def _checkSelector(selector: str) -> str:
    lowered = selector.lower()
    if not _SELECTOR.fullmatch(lowered):
        raise DkimError(
            f"the selector {selector!r} is not a DNS name "
            "(letters, digits, inner hyphens, dots between labels)"
        )
    return lowered


def generateKey(
    domain: str, selector: str, algorithm: Literal["rsa", "ed25519"], now: datetime
) -> DkimKey:
    """
    A new signing key for ``domain`` (stored in normal form: lower-case, IDNA A-labels) under
    ``selector``: RSA 2048-bit or Ed25519, as unencrypted PKCS#8 PEM, created ``now``.
    Raises DkimError for a domain or selector that cannot be a DNS name, or another algorithm.
    """
    try:
        domain = normaliseDomain(domain)
    except ValueError as e:
        raise DkimError(f"cannot sign for {domain!r}: {e}") from None
    if domain.startswith("["):
        raise DkimError(f"cannot sign for an address literal ({domain})")
    selector = _checkSelector(selector)
    if len(f"{selector}._domainkey.{domain}") > MAX_DOMAIN:
        raise DkimError(f"{selector}._domainkey.{domain} is longer than a DNS name may be")
    privateKey: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa":
        privateKey = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    elif algorithm == "ed25519":
        privateKey = ed25519.Ed25519PrivateKey.generate()
    else:
        raise DkimError(f"the algorithm must be rsa or ed25519, not {algorithm!r}")
    pem = privateKey.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return DkimKey(
        domain=domain, selector=selector, algorithm=algorithm, private_key=pem, created_at=now
    )


def _loadPrivateKey(key: DkimKey) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        loaded = serialization.load_pem_private_key(key.private_key, password=None)
    except (ValueError, TypeError):
        raise DkimError(f"the DKIM key of {key.domain} is not an unencrypted PEM key") from None
    expected = rsa.RSAPrivateKey if key.algorithm == "rsa" else ed25519.Ed25519PrivateKey
    if not isinstance(loaded, expected):
        raise DkimError(f"the DKIM key of {key.domain} is not an {key.algorithm} key")
    return loaded


def dnsRecord(key: DkimKey) -> tuple[str, str]:
    """
    The TXT record that publishes ``key``'s public half: its name
    (``<selector>._domainkey.<domain>``) and its text, ``v=DKIM1; k=rsa; p=<base64>`` with the
    DER SubjectPublicKeyInfo for RSA, or ``k=ed25519`` with the raw 32-byte key (RFC 8463).
    An RSA text is longer than 255 octets: a zone file writes it as several quoted strings.
    """
    privateKey = _loadPrivateKey(key)
    if isinstance(privateKey, rsa.RSAPrivateKey):
        public = privateKey.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        public = privateKey.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    text = f"v=DKIM1; k={key.algorithm}; p={base64.b64encode(public).decode('ascii')}"
    return f"{key.selector}._domainkey.{key.domain}", text


@dataclass(frozen=True)
class _Signed:
    signature: bytes


class _Ed25519Signer:
    """What dkimpy's ``gen_header`` calls for Ed25519 (PyNaCl's ``SigningKey`` interface:
    ``sign(digest).signature``), backed by ``cryptography``."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> _Signed:
        return _Signed(self._key.sign(data))


class _RSASigner:
    """The same interface for RSA: PKCS#1 v1.5 over the SHA-256 digest ``gen_header`` hands
    over, by ``cryptography`` (OpenSSL) instead of dkimpy's pure-Python RSA, which takes
    ~20 times as long (8.7 ms against 0.4 ms a signature for 2048 bits). PKCS#1 v1.5 is
    deterministic: the bytes are those dkimpy's own RSA would give."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> _Signed:
        return _Signed(self._key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())))


@dataclass(frozen=True)
class _ParsedKey:
    """A key in the form dkimpy's ``gen_header`` signs with, and what it was parsed from."""

    source: DkimKey
    algorithm: bytes
    signer: Any  # an _RSASigner or an _Ed25519Signer


def _parse(key: DkimKey) -> _ParsedKey:
    privateKey = _loadPrivateKey(key)
    signer: Any
    if isinstance(privateKey, rsa.RSAPrivateKey):
        signer = _RSASigner(privateKey)
    else:
        signer = _Ed25519Signer(privateKey)
    return _ParsedKey(key, _SIGNATURE_ALGORITHMS[key.algorithm], signer)


class _Signature(dkim.DKIM):
    """
    dkimpy's signer with the ``t=`` tag given and the key parsed beforehand. ``signWith``
    builds the tag list exactly as ``dkim.DKIM.sign`` (dkimpy 1.1) does; the rest is
    dkimpy's own code.
    """

    def signWith(self, key: _ParsedKey, timestamp: int) -> bytes:
        """The ``DKIM-Signature`` field (ending in CRLF) for the loaded message."""
        self.signature_algorithm = key.algorithm
        self.hasher = HASH_ALGORITHMS[key.algorithm]
        canonPolicy = CanonicalizationPolicy.from_c_value(b"/".join(_CANONICALIZE))
        includeHeaders = [name.lower() for name in self.default_sign_headers()]
        if b"from" not in includeHeaders:
            # RFC 6376 §5.4: From must be signed; signing the absent field also stops one
            # from being added.
            includeHeaders.append(b"from")
        self.include_headers = tuple(includeHeaders)
        bodyHash = self.hasher(canonPolicy.canonicalize_body(self.body)).digest()
        domain = key.source.domain.encode("ascii")
        selector = key.source.selector.encode("ascii")
        fields = [
            (b"v", b"1"),
            (b"a", key.algorithm),
            (b"c", canonPolicy.to_c_value()),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(int(timestamp)).encode("ascii")),
            (b"h", b" : ".join(self.include_headers)),
            (b"bh", base64.b64encode(bodyHash)),
            # A placeholder b= of one line's length, as dkimpy's: b= then folds onto lines
            # of its own, so folding after signing moves no other tag.
            (b"b", b"0" * 60),
        ]
        # gen_header picks how to sign by signature_algorithm: its Ed25519 branch calls
        # ``signer.sign(digest)``, which both of our signers answer (the a= tag written is
        # the key's own, above; the digest is SHA-256 for both algorithms).
        self.signature_algorithm = b"ed25519-sha256"
        value = self.gen_header(
            fields, self.include_headers, canonPolicy, b"DKIM-Signature", key.signer
        )
        self.signature_algorithm = key.algorithm
        self.domain = domain
        self.selector = selector
        self.signature_fields = dict(fields)
        return b"DKIM-Signature: " + bytes(value)


class DkimSigner:
    """
    Signs messages, keeping each domain's key parsed: loading an RSA key (``cryptography``
    checks it) takes several times as long as a signature (~40 ms against ~7 ms for 2048
    bits, dkimpy's pure-Python RSA). A key replaced for a domain is parsed anew.
    """

    def __init__(self) -> None:
        self._keys: dict[str, _ParsedKey] = {}

    def _parsed(self, key: DkimKey) -> _ParsedKey:
        parsed = self._keys.get(key.domain)
        if parsed is None or parsed.source != key:
            parsed = self._keys[key.domain] = _parse(key)
        return parsed

    def sign(self, message: bytes, key: DkimKey, timestamp: int) -> bytes:
        """
        ``message`` (CRLF line ends) with a ``DKIM-Signature`` field for ``key.domain`` on
        top, ``t=`` being ``timestamp`` (POSIX seconds). The same arguments give the same
        bytes. Raises DkimError when the key cannot be read or the header cannot be parsed
        (a line that is neither a field nor a continuation).
        """
        parsed = self._parsed(key)
        signature = _Signature(signature_algorithm=parsed.algorithm)
        try:
            signature.set_message(message)
            field = signature.signWith(parsed, timestamp)
        except dkim.DKIMException as e:
            raise DkimError(f"cannot sign for {key.domain}: {e}") from None
        return field + message


def sign(message: bytes, key: DkimKey, *, timestamp: int) -> bytes:
    """:meth:`DkimSigner.sign` without a cache of parsed keys: for one message."""
    return DkimSigner().sign(message, key, timestamp)
