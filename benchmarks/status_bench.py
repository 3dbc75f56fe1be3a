"""
Status API benchmark: requests per second for ``GET /{accountId}/notifications/id/{id}``.

Keep-alive HTTP/1.1 connections on loopback, each sending its next request as soon as the last
answer is in; bounded by a request count and a duration, whichever comes first. Every answer
must be 200 (anything else is counted and reported as an error).

Two ways to run it (from the repository root):

* self-served (default): a child process opens a fresh SQLite store in a temporary directory,
  adds an account, API key and ``--notifications`` notifications, and serves
  :func:`mailrelay.web.makeWebSite` on 127.0.0.1 -- the same site ``twistd mailrelay`` serves,
  with the real portal and Argon2 hashes. Client and server get a process each::

      python -m benchmarks.status_bench --connections 8 --requests 20000 --duration 10
      python -m benchmarks.status_bench --auth-cache 0 --requests 500   # Argon2 every request
      python -m benchmarks.status_bench --api-key                       # App + API key

* against a running relay's ``[web] endpoint``::

      python -m benchmarks.status_bench --url http://127.0.0.1:8025 \\
          --user acme --password PW --id 912249387004985344

The client is plain asyncio streams (no HTTP library) so that it costs the server's CPU as
little as possible; the server's CPU time per request is reported when it is our child.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.procstat import cpu_seconds

PASSWORD = "benchmark-password"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    """Where to send the requests, and as whom."""

    host: str
    port: int
    account: str
    user: str
    password: str
    ids: list[str]
    recipient: str | None = None


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    codes: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Budget:
    """How many requests may still be sent, and until when."""

    remaining: int
    deadline: float

    def take(self) -> bool:
        if self.remaining <= 0 or time.monotonic() >= self.deadline:
            return False
        self.remaining -= 1
        return True


def requestBytes(target: Target, notificationId: str) -> bytes:
    credentials = base64.b64encode(f"{target.user}:{target.password}".encode()).decode()
    path = f"/{target.account}/notifications/id/{notificationId}"
    if target.recipient:
        path += f"?recipient={target.recipient}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Authorization: Basic {credentials}\r\nAccept: application/json\r\n\r\n"
    ).encode()


async def readResponse(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response's status code and body (Content-Length framing, as the relay sends)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    code = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    return code, body


async def connection(
    target: Target, budget: Budget, results: Results, offset: int, record: bool
) -> None:
    """One keep-alive connection sending requests one after another while the budget lasts."""
    reader, writer = await asyncio.open_connection(target.host, target.port)
    requests = [requestBytes(target, nid) for nid in target.ids]
    i = offset
    try:
        while budget.take():
            started = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            code, body = await readResponse(reader)
            elapsed = time.perf_counter() - started
            if not record:
                continue
            results.codes[code] += 1
            if code == 200 and b"CAAS_RECEIVED" in body:
                results.latencies.append(elapsed)
            else:
                results.errors[f"HTTP {code}" if code != 200 else "no event in body"] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        results.errors[type(e).__name__] += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def run(
    target: Target, connections: int, requests: int, duration: float, warmup: int
) -> tuple[Results, float]:
    """Warm up (``warmup`` requests per connection, not counted), then measure."""
    far = time.monotonic() + 60
    await asyncio.gather(
        *(
            connection(target, Budget(warmup, far), Results(), n, record=False)
            for n in range(connections)
        )
    )
    results = Results()
    budget = Budget(requests, time.monotonic() + duration)
    started = time.perf_counter()
    await asyncio.gather(
        *(connection(target, budget, results, n * 7, record=True) for n in range(connections))
    )
    return results, time.perf_counter() - started


def report(results: Results, elapsed: float, serverCpu: float | None, label: str) -> dict[str, Any]:
    ok = len(results.latencies)
    latencies = sorted(results.latencies)

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if ok else 0.0

    summary: dict[str, Any] = {
        "label": label,
        "requests_ok": ok,
        "errors": dict(results.errors),
        "seconds": round(elapsed, 3),
        "requests_per_second": round(ok / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {
            "mean": round(statistics.fmean(latencies) * 1000, 3) if ok else 0.0,
            "p50": round(percentile(0.50), 3),
            "p90": round(percentile(0.90), 3),
            "p99": round(percentile(0.99), 3),
            "max": round(latencies[-1] * 1000, 3) if ok else 0.0,
        },
    }
    if serverCpu is not None and ok:
        summary["server_cpu_us_per_request"] = round(serverCpu / ok * 1e6, 1)
    return summary


# -- the self-served site (runs in a child process) --


def serve(notifications: int, authCache: float) -> None:
    """Child process: a populated store and the web site on 127.0.0.1:0; prints one JSON line
    (port, account, password, API key, ids) and serves until stdin closes."""
    import tempfile
    from datetime import UTC, datetime

    from twisted.internet import reactor as globalReactor
    from twisted.internet import stdio
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Protocol
    from twisted.python.threadpool import ThreadPool

    from mailrelay.auth.realm import makePortal
    from mailrelay.auth.secrets import hashPassword, newApiKey
    from mailrelay.auth.throttle import LoginThrottle
    from mailrelay.config import parseConfig
    from mailrelay.model import HeaderOptions, Notification, Recipient, StatusEvent
    from mailrelay.store.sqlite import SQLiteStore
    from mailrelay.submission import Submissions
    from mailrelay.web import makeWebSite

    reactor: Any = globalReactor

    class StopOnEOF(Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            reactor.stop()

    async def setUp() -> None:
        directory = Path(tempfile.mkdtemp(prefix="status-bench-"))
        store = SQLiteStore(directory / "mailrelay.sqlite3", reactor)
        await store.open()
        pool = ThreadPool(minthreads=1, maxthreads=2, name="bench-auth")
        pool.start()
        reactor.addSystemEventTrigger("before", "shutdown", pool.stop)
        config = parseConfig({"hostname": "bench.test", "data_dir": str(directory)})
        portal, _ = makePortal(
            store, Submissions(store, config, reactor), reactor, pool, rememberPasswords=authCache
        )
        await store.addAccount("bench", hashPassword(PASSWORD))
        keyId, key, keyHash = newApiKey()
        await store.addApiKey("bench", keyId, keyHash)
        now = datetime.now(UTC)
        recipients = (Recipient("name1@customer.com", "email"), Recipient("+4477331234567", "sms"))
        ids = []
        for _ in range(notifications):
            notification = Notification(
                notification_id=store.nextNotificationId(),
                account="bench",
                sender="app@bench.test",
                recipients=recipients,
                size=2048,
                received_at=now,
                options=HeaderOptions(),
            )
            await store.enqueue(notification, b"Subject: bench\r\n\r\nbody\r\n")
            await store.addEvents(
                [
                    StatusEvent(notification.notification_id, r, "CAAS_SENT", "Successful", now)
                    for r in recipients
                ]
            )
            ids.append(notification.notification_id)
        site = makeWebSite(
            store,
            portal,
            LoginThrottle(reactor.seconds),
            config,
            reactor,
        )
        site.noisy = False
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        info = {"port": port.getHost().port, "password": PASSWORD, "apiKey": key, "ids": ids}
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()
        stdio.StandardIO(StopOnEOF())

    def failed(failure: Any) -> None:
        failure.printTraceback()
        reactor.stop()

    Deferred.fromCoroutine(setUp()).addErrback(failed)
    reactor.run()


# -- the command line --


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running relay's web endpoint (loopback only)")
    parser.add_argument("--user", help="account name (or App with --password = an API key)")
    parser.add_argument("--account", help="accountId in the path (default: --user)")
    parser.add_argument("--password")
    parser.add_argument("--id", action="append", dest="ids", help="notification id(s) to ask")
    parser.add_argument("--recipient", help="recipient filter, e.g. email:name1@customer.com")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20000, help="at most this many")
    parser.add_argument("--duration", type=float, default=10.0, help="at most this long (s)")
    parser.add_argument("--warmup", type=int, default=5, help="uncounted requests per connection")
    parser.add_argument("--notifications", type=int, default=1000, help="self-served only")
    parser.add_argument(
        "--auth-cache", type=float, default=60.0, help="self-served: seconds (0: Argon2 always)"
    )
    parser.add_argument("--api-key", action="store_true", help="self-served: log in as App")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 256 or not 1 <= args.requests <= 1_000_000:
        parser.error("--connections 1..256, --requests 1..1000000")
    if not 0 < args.duration <= 300:
        parser.error("--duration must be in (0, 300] seconds")

    if args.serve:
        serve(args.notifications, args.auth_cache)
        return 0

    server: subprocess.Popen[bytes] | None = None
    if args.url:
        parts = urlsplit(args.url)
        if parts.scheme != "http" or not parts.hostname or not loopback(parts.hostname):
            parser.error("--url must be http:// on a loopback address")
        if not (args.user and args.password and args.ids):
            parser.error("--url needs --user, --password and --id")
        target = Target(
            parts.hostname,
            parts.port or 80,
            args.account or args.user,
            args.user,
            args.password,
            args.ids,
            args.recipient,
        )
        label = f"relay at {args.url}"
    else:
        command = [sys.executable, "-m", "benchmarks.status_bench", "--serve"]
        command += ["--notifications", str(args.notifications)]
        command += ["--auth-cache", str(args.auth_cache)]
        server = subprocess.Popen(
            command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line:
            print("the benchmark server did not start", file=sys.stderr)
            return 1
        info = json.loads(line)
        user, password = ("App", info["apiKey"]) if args.api_key else ("bench", info["password"])
        target = Target(
            "127.0.0.1", info["port"], "bench", user, password, info["ids"], args.recipient
        )
        label = (
            f"self-served, {'API key' if args.api_key else 'password'}, "
            f"auth cache {args.auth_cache:g}s"
        )

    try:
        cpuBefore = cpu_seconds(server.pid) if server else None
        results, elapsed = asyncio.run(
            run(target, args.connections, args.requests, args.duration, args.warmup)
        )
        serverCpu = (
            cpu_seconds(server.pid) - cpuBefore if server and cpuBefore is not None else None
        )
    finally:
        if server is not None:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=30)

    summary = report(results, elapsed, serverCpu, label)
    summary["connections"] = args.connections
    if args.json:
        print(json.dumps(summary))
    else:
        latency = summary["latency_ms"]
        print(f"{label}: {args.connections} keep-alive connections")
        print(
            f"  {summary['requests_ok']} requests in {summary['seconds']} s = "
            f"{summary['requests_per_second']} req/s"
        )
        print(
            f"  latency ms: mean {latency['mean']} p50 {latency['p50']} p90 {latency['p90']} "
            f"p99 {latency['p99']} max {latency['max']}"
        )
        if "server_cpu_us_per_request" in summary:
            print(f"  server CPU per request: {summary['server_cpu_us_per_request']} us")
        if summary["errors"]:
            print(f"  errors: {summary['errors']}")
    return 0 if not results.errors else 1


if __name__ == "__main__":
    sys.exit(main())
