"""
Baseline: a plain Twisted ESMTP server that accepts every message and stores nothing.

``twisted.mail.smtp.ESMTP`` with an in-memory ``IMessageDelivery``: each IMessage collects the
lines and drops them at end of data. Listeners (all on 127.0.0.1 unless ``--host``):

* ``--port``: no TLS, no AUTH (the relay-by-IP shape);
* ``--starttls-port``: STARTTLS offered, AUTH PLAIN against ``--user``/``--password``;
* ``--tls-port``: implicit TLS, AUTH PLAIN.

The TLS listeners need ``--cert`` and ``--key`` (PEM). PIPELINING is advertised: Twisted's
line-at-a-time parser handles pipelined commands in order when validation is synchronous, as here.

    python benchmarks/servers/twisted_plain.py --port 2525 [--pidfile FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from twisted.cred import checkers, portal
from twisted.internet import endpoints, ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.internet.protocol import Factory
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials  # the public name of twisted.mail._cred
from twisted.python import log
from twisted.python.failure import Failure
from zope.interface import implementer

from benchmarks.servers import baselineArguments, checkedArguments


@implementer(smtp.IMessage)
class DiscardingMessage:
    """Collects a message's lines; forgets them at end of data."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Deferred[None]:
        self.lines = []
        return succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class MemoryDelivery:
    """Accepts any sender and recipient."""

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: object, recipients: list) -> bytes:
        return b"Received: from " + helo[0] + b" by bench.local with ESMTP"

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> type[DiscardingMessage]:
        return DiscardingMessage


@implementer(portal.IRealm)
class DeliveryRealm:
    def requestAvatar(self, avatarId: object, mind: object, *interfaces: object) -> tuple:
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, MemoryDelivery(), lambda: None
        raise NotImplementedError()


class PipeliningESMTP(smtp.ESMTP):
    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext = super().extensions()
        ext[b"PIPELINING"] = None
        return ext


class BenchESMTPFactory(Factory):
    """One listener: with ``portal``, AUTH PLAIN is required; without, anyone may send."""

    def __init__(
        self, cred_portal: portal.Portal | None = None, tls: ssl.CertificateOptions | None = None
    ) -> None:
        self.portal: portal.Portal | None = cred_portal
        self.tls = tls

    def buildProtocol(self, addr: object) -> PipeliningESMTP:
        chal = {b"PLAIN": PLAINCredentials} if self.portal else {}
        proto = PipeliningESMTP(chal, self.tls)
        proto.factory = self
        proto.host = b"bench.local"
        if self.portal:
            proto.portal = self.portal  # type: ignore[assignment]  # declared None in Twisted
        else:
            proto.delivery = MemoryDelivery()
        return proto


def listen(reactor: IReactorCore, args: argparse.Namespace) -> list[Deferred[IListeningPort]]:
    """Start the listeners the arguments ask for (port None: off, 0: any); one Deferred each."""
    started = []
    plain = f"tcp:{args.port}:interface={args.host}:backlog=1024"
    started.append(endpoints.serverFromString(reactor, plain).listen(BenchESMTPFactory()))
    if args.starttls_port is not None or args.tls_port is not None:
        pem = Path(args.cert).read_bytes() + Path(args.key).read_bytes()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(args.user.encode(), args.password.encode())
        cred_portal = portal.Portal(DeliveryRealm(), [checker])
        if args.starttls_port is not None:
            desc = f"tcp:{args.starttls_port}:interface={args.host}:backlog=1024"
            factory = BenchESMTPFactory(cred_portal, options)
            started.append(endpoints.serverFromString(reactor, desc).listen(factory))
        if args.tls_port is not None:
            tls_ep = endpoints.SSL4ServerEndpoint(
                reactor, args.tls_port, options, backlog=1024, interface=args.host
            )
            started.append(tls_ep.listen(BenchESMTPFactory(cred_portal)))
    return started


def main(argv: list[str] | None = None) -> None:
    p = baselineArguments("plain Twisted ESMTP baseline (stores nothing)")
    p.add_argument("--verbose", action="store_true")
    args = checkedArguments(p, argv)

    from twisted.internet import (
        reactor,  # epoll on Linux; imported late so tests can reuse listen()
    )

    if args.verbose:
        log.startLogging(sys.stderr)

    def failed(reason: Failure) -> None:
        log.err(reason)
        reactor.stop()

    for d in listen(reactor, args):
        d.addErrback(failed)
    print(f"twisted_plain pid {os.getpid()} listening", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
