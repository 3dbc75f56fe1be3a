"""
Baseline: aiosmtpd with an in-memory handler that accepts every message and stores nothing.

Same listeners and flags as ``twisted_plain.py``: ``--port`` (no TLS, no AUTH),
``--starttls-port`` (STARTTLS + AUTH PLAIN), ``--tls-port`` (implicit TLS + AUTH PLAIN).
PIPELINING is advertised: aiosmtpd reads and answers commands strictly in order. Runs on
asyncio's own event loop, as aiosmtpd users get it (``--uvloop`` to try uvloop).

    python benchmarks/servers/aiosmtpd_plain.py --port 2526 [--pidfile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from benchmarks.servers import baselineArguments, checkedArguments


class DiscardingHandler:
    """Accepts any envelope; the message aiosmtpd collected is dropped at end of data."""

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


class Authenticator:
    """AUTH PLAIN/LOGIN against one user name and password."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user.encode()
        self.password = password.encode()

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            self.user,
            self.password,
        )
        return AuthResult(success=ok)


async def serve(args: argparse.Namespace) -> list[asyncio.Server]:
    """Start every listener the arguments ask for."""
    loop = asyncio.get_running_loop()
    handler = DiscardingHandler()

    def smtp(**options: Any) -> SMTP:
        return SMTP(handler, hostname="bench.local", ident="aiosmtpd bench", **options)

    servers = [await loop.create_server(smtp, args.host, args.port, backlog=1024)]
    if args.starttls_port or args.tls_port:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        auth = Authenticator(args.user, args.password)
        if args.starttls_port:
            servers.append(
                await loop.create_server(
                    lambda: smtp(tls_context=ctx, authenticator=auth),
                    args.host,
                    args.starttls_port,
                    backlog=1024,
                )
            )
        if args.tls_port:
            # Implicit TLS: aiosmtpd does not see the TLS layer, so it must not insist on it.
            servers.append(
                await loop.create_server(
                    lambda: smtp(authenticator=auth, auth_require_tls=False),
                    args.host,
                    args.tls_port,
                    ssl=ctx,
                    backlog=1024,
                )
            )
    return servers


async def _main(args: argparse.Namespace) -> None:
    await serve(args)
    print(f"aiosmtpd_plain pid {os.getpid()} listening", flush=True)
    await asyncio.Event().wait()  # until SIGTERM/SIGINT


def main(argv: list[str] | None = None) -> None:
    p = baselineArguments("aiosmtpd baseline (stores nothing)")
    p.add_argument("--uvloop", action="store_true")
    args = checkedArguments(p, argv)
    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_main(args))


if __name__ == "__main__":
    main()
