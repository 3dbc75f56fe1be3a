"""
The web process: ``python -m mailrelay.workers.web --listener 0:FD:FAMILY --forward PORT``,
started by :class:`~mailrelay.workers.pool.WorkerPool` when the web endpoint has a process of
its own (``[web] process``, :func:`mailrelay.config.webInOwnProcess`).

It answers the status API from the store, in a process that neither accepts mail nor
delivers it: a customer's poll is not queued behind the delivery of a backlog. What only
the main process knows -- ``/healthz``, ``/metrics``, the SMS gateway's receipts -- it
forwards to the main process's private web listener, ``127.0.0.1:PORT``
(:class:`~mailrelay.web.forward.MainProcessForward`). While it is not serving (starting,
restarting), the main process answers the endpoint itself.

Like an intake worker, it gets its setup through a pipe, logs to stderr, tells the main
process ``ready`` and sends its counters every second on stdout, takes ``reload`` lines on
stdin, and stops on SIGTERM or when its stdin closes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.web import server

from mailrelay.config import Config, proxied
from mailrelay.core import RelayCore, buildCore, collectGarbageLessOften, freezeStartHeap
from mailrelay.files import keepFilesPrivate
from mailrelay.lifecycle import RelayRoot, SignalService
from mailrelay.web import makeWebSite
from mailrelay.web.forward import MainProcessForward
from mailrelay.workers.child import (
    METRICS_INTERVAL,
    AdoptedEndpoint,
    InheritedListener,
    MainProcessPipes,
    inheritedListener,
    takeSetup,
)
from mailrelay.workers.pool import SETUP_FD, WorkerSetup

log = Logger()


def statusSite(
    config: Config, core: RelayCore, reactor: Any, forward: MainProcessForward
) -> server.Site:
    """The web endpoint's site in the web process: the status API from ``core``'s store, the
    rest forwarded to the main process."""
    return makeWebSite(
        core.store,
        core.portal,
        core.throttle,
        config,
        reactor,
        forward=forward,
    )


def serveWeb(
    reactor: Any, listener: InheritedListener, endpoint: str, site: server.Site
) -> Deferred[Any]:
    """Listen with ``site`` on the inherited socket of the web endpoint ``endpoint`` (a
    ``haproxy:`` one reads the PROXY header first, as in the main process)."""
    adopted: Any = AdoptedEndpoint(reactor, listener)
    if proxied(endpoint)[0]:
        adopted = proxyEndpoint(adopted)
    return adopted.listen(site)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mailrelay.workers.web",
        description="The mailrelay web process (started by the main process, not by hand).",
    )
    parser.add_argument("--listener", type=inheritedListener, required=True)
    parser.add_argument("--forward", type=int, required=True)
    parser.add_argument("--setup-fd", type=int, default=SETUP_FD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    keepFilesPrivate()
    collectGarbageLessOften()
    setup, config = takeSetup(args.setup_fd, "web process")

    from twisted.internet import reactor

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the main process hands reloads over
    root = RelayRoot(reactor, config.limits.drain_timeout)
    # Instance 0, the main file as home, like the admin command: it reads every file and
    # writes nothing of its own.
    core = buildCore(config, reactor, root, tlsPEM=setup.tlsPEM, readsOnly=True)
    root.last.append(core.storeService)
    forward = MainProcessForward(reactor, args.forward)
    site = statusSite(config, core, reactor, forward)

    def reload(new: WorkerSetup) -> None:
        # The main process validated it; the retention period is what the site takes.
        try:
            newConfig = new.config()
        except ValueError as e:
            log.error("reload refused: {error}", error=str(e))
            return
        site.resource = statusSite(newConfig, core, reactor, forward).resource
        log.info("reloaded")

    signals = SignalService(reactor, lambda: None)
    signals.setServiceParent(root)
    control = MainProcessPipes(reactor, signals.stop, reload)
    StandardIO(control, stdin=0, stdout=1, reactor=reactor)  # type: ignore[call-arg]
    root.privilegedStartService()
    ports: list[Any] = []

    def cannotServe(failure: Any) -> None:
        # e.g. a socket that cannot be adopted: end, and be started again.
        sys.stderr.write(f"mailrelay: web process cannot serve: {failure.value}\n")
        sys.stderr.flush()
        os._exit(1)

    def serving(port: Any) -> None:
        ports.append(port)
        # The reactor took a duplicate of the descriptor; the inherited one is not needed.
        os.close(args.listener.fd)
        control.tellReady()
        freezeStartHeap()

    def start() -> None:
        root.startService()
        ready = core.storeService.whenReady()
        ready.addCallback(lambda _: serveWeb(reactor, args.listener, config.web.endpoint, site))
        ready.addCallbacks(serving, cannotServe)
        LoopingCall(control.sendMetrics).start(METRICS_INTERVAL, now=False)

    def stopListening() -> Any:
        return ports[0].stopListening() if ports else None

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stopListening)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
