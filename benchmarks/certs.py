"""A throwaway certificate for the TLS scenarios (loopback only; clients don't verify it)."""

from __future__ import annotations

from pathlib import Path

import trustme


def make_cert(directory: Path, hostname: str = "bench.local") -> tuple[Path, Path]:
    """Write ``cert.pem`` (leaf + chain) and ``key.pem`` into ``directory``; return both paths."""
    ca = trustme.CA()
    leaf = ca.issue_cert(hostname, "localhost", "127.0.0.1", "::1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return cert, key
