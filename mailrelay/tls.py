"""
The server's TLS context: the configured certificate, or a self-signed one made on first start.

Only TLS 1.2 and later are offered, with forward-secret AEAD ciphers only. The certificate
file may hold a full chain (leaf first).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailrelay.config import Config
from mailrelay.files import writePrivately

log = Logger()

SELF_SIGNED_CERT = "selfsigned-cert.pem"
SELF_SIGNED_KEY = "selfsigned-key.pem"


def generateSelfSigned(hostname: str, certPath: Path, keyPath: Path) -> None:
    """Write a new self-signed ECDSA P-256 certificate for ``hostname`` and its key (mode 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keyBytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    writePrivately(keyPath, keyBytes)
    writePrivately(certPath, certificate.public_bytes(serialization.Encoding.PEM))


def certificatePaths(config: Config) -> tuple[Path, Path]:
    """The certificate and key to use, generating the self-signed pair if none is configured."""
    if config.tls.certificate and config.tls.key:
        return Path(config.tls.certificate), Path(config.tls.key)
    certPath = config.dataPath / SELF_SIGNED_CERT
    keyPath = config.dataPath / SELF_SIGNED_KEY
    if not (certPath.exists() and keyPath.exists()):
        config.dataPath.mkdir(mode=0o700, parents=True, exist_ok=True)
        generateSelfSigned(config.hostname, certPath, keyPath)
        log.warn(
            "No [tls] certificate configured: generated a self-signed one for {hostname} at "
            "{path}. Clients will not trust it; configure [tls] for production.",
            hostname=config.hostname,
            path=str(certPath),
        )
    return certPath, keyPath


def _pemBlocks(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [block + marker + b"\n" for block in data.split(marker)[:-1]]


def readPEM(certPath: Path, keyPath: Path) -> tuple[bytes, bytes]:
    """The certificate (chain) and key files' bytes; raises ValueError naming a missing one."""
    try:
        return certPath.read_bytes(), keyPath.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read TLS file: {e}") from None


_TLS12_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""TLS 1.2's ciphers: Mozilla's "intermediate" list without DHE (which would need DH
parameters): forward secrecy and AEAD only, no static RSA key exchange, no CBC with SHA-1.
TLS 1.3's own suites are all of that already."""


def contextFromPEM(certData: bytes, keyData: bytes, where: str = "TLS") -> CertificateOptions:
    """TLS 1.2+ server options from PEM bytes (leaf first, then the chain; the key); raises
    ValueError naming ``where`` when they are not a usable certificate and key."""
    blocks = _pemBlocks(certData)
    if not blocks:
        raise ValueError(f"{where}: no certificate found")
    try:
        leaf = PrivateCertificate.loadPEM(keyData + b"\n" + blocks[0])
        chain = [Certificate.loadPEM(block).original for block in blocks[1:]]
    except Exception as e:
        raise ValueError(f"{where}: not a usable certificate and key: {e}") from None
    return CertificateOptions(
        privateKey=leaf.privateKey.original,
        certificate=leaf.original,
        extraCertChain=chain,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=_TLS12_CIPHERS,
    )


@implementer(IOpenSSLContextFactory)
class ReloadableTLS:
    """
    A server TLS context factory whose certificate a reload replaces: every new connection
    (implicit TLS, or a STARTTLS) takes the context of :attr:`current` at its handshake; the
    connections already encrypted keep theirs.
    """

    def __init__(self, current: CertificateOptions) -> None:
        self.current = current

    def getContext(self) -> Any:
        return self.current.getContext()
