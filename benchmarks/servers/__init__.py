import argparse
import os
from pathlib import Path


def baselineArguments(description: str) -> argparse.ArgumentParser:
    """The command line both baseline servers take (they differ only in one extra flag)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--starttls-port", type=int)
    p.add_argument("--tls-port", type=int)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--user", default="bench")
    p.add_argument("--password", default="bench-password")
    p.add_argument("--pidfile")
    return p


def checkedArguments(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, refuse TLS listeners without a certificate, and write the pidfile if asked."""
    args = p.parse_args(argv)
    if (args.starttls_port is not None or args.tls_port is not None) and not (
        args.cert and args.key
    ):
        p.error("TLS listeners need --cert and --key")
    if args.pidfile:
        Path(args.pidfile).write_text(f"{os.getpid()}\n")
    return args
