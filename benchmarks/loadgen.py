"""
SMTP load generator: many concurrent sessions, pipelined transactions, pre-built blobs.

Two modes:

* **load** (default): ``concurrency`` sessions send messages until ``duration`` seconds after a
  ``warmup`` have passed (or until ``messages`` were sent). Only messages whose final reply
  arrives inside the window count toward messages/s and latency; errors are counted throughout.
* **idle** (``--idle N``): open N sessions, EHLO, hold them, and report the server's RSS growth
  per connection.

Usage (from the repository root)::

    python -m benchmarks.loadgen --port 2525 --size 2048 --rcpts 1 --concurrency 10 \
        --duration 10 --server-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from typing import Any

from benchmarks.messages import Blobs, auth_plain
from benchmarks.procstat import ServerMonitor, ServerUsage, rss_kib, tree_pss_kib
from benchmarks.smtpclient import (
    ReplyCounter,
    SMTPReplyError,
    client_tls_context,
    ehlo,
    expect,
)

SECURITIES = ("plain", "starttls", "tls")
_NO_LIMIT = sys.maxsize


@dataclass(frozen=True)
class LoadConfig:
    """One load run. ``security``: plain (no TLS), starttls, or tls (implicit)."""

    host: str = "127.0.0.1"
    port: int = 2525
    security: str = "plain"
    user: str | None = None  # AUTH PLAIN when set
    password: str = ""
    size: int = 2048
    rcpts: int = 1
    concurrency: int = 10
    per_connection: int = 0  # messages per session; 0: persistent (until the run ends)
    messages: int = 0  # cap on messages sent (warm-up included); 0: none
    duration: float = 10.0  # the measurement window, seconds
    warmup: float = 1.0
    pipelining: str = "auto"  # auto: where advertised | on | off
    processes: int = 1  # load generator processes sharing the sessions
    grace: float = 30.0  # time for in-flight transactions after the window, then abort


@dataclass
class WorkerResult:
    """What one load generator process saw."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    exhausted: bool = False  # the message cap ended the run before the window did
    last_done: float = 0.0
    cpu_s: float = 0.0  # this process's CPU during the window


@dataclass
class LoadResult:
    """A whole run: every process merged, plus the server's usage over the window."""

    config: LoadConfig
    ok: int
    errors: dict[str, int]
    window_s: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu_s: list[float]  # one entry per load generator process
    server: ServerUsage | None

    @property
    def msgs_per_s(self) -> float:
        return self.ok / self.window_s if self.window_s > 0 else 0.0

    @property
    def server_cpu_per_1k(self) -> float | None:
        if self.server is None or not self.ok:
            return None
        return self.server.cpu_s / self.ok * 1000

    @property
    def loadgen_cpu_pct(self) -> float:
        """The busiest load generator process's CPU, in percent of one core."""
        busiest = max(self.loadgen_cpu_s, default=0.0)
        return 100 * busiest / self.window_s if self.window_s > 0 else 0.0

    @property
    def other_cpu_pct(self) -> float | None:
        """CPU used during the window by everything but the server and the load generator,
        in percent of one core: other work on the machine that may have skewed the run."""
        if self.server is None or self.window_s <= 0:
            return None
        other = self.server.machine_busy_s - self.server.cpu_s - sum(self.loadgen_cpu_s)
        return max(0.0, 100 * other / self.window_s)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "msgs_per_s": round(self.msgs_per_s, 1),
            "ok": self.ok,
            "window_s": round(self.window_s, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "errors": self.errors,
            "loadgen_cpu_pct": round(self.loadgen_cpu_pct, 1),
        }
        if self.server is not None:
            out["server_cpu_s"] = round(self.server.cpu_s, 3)
            out["server_cpu_per_1k_s"] = self.server_cpu_per_1k
            out["server_peak_rss_kib"] = self.server.peak_rss_kib
            out["other_cpu_pct"] = round(self.other_cpu_pct or 0.0, 1)
        return out


@dataclass
class IdleResult:
    """Idle sessions held open and what they cost the server."""

    requested: int
    held: int
    errors: dict[str, int]
    rss_before_kib: int
    rss_after_kib: int

    @property
    def kib_per_conn(self) -> float | None:
        if not self.held or not self.rss_after_kib:
            return None
        return (self.rss_after_kib - self.rss_before_kib) / self.held


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def _error_key(exc: BaseException) -> str:
    if isinstance(exc, SMTPReplyError):
        return f"{exc.step}:{exc.code}"
    return f"conn:{type(exc).__name__}"


class _Load:
    """One process's share of a load run: the sessions, their counters and their bounds."""

    def __init__(
        self, cfg: LoadConfig, concurrency: int, messages: int, t_start: float, t_end: float
    ) -> None:
        self.cfg = cfg
        self.concurrency = concurrency
        self.remaining = messages or _NO_LIMIT
        self.t_start = t_start
        self.t_end = t_end
        self.blobs = Blobs.build(cfg.size, cfg.rcpts)
        self.auth = auth_plain(cfg.user, cfg.password) if cfg.user else b""
        self.tls = client_tls_context() if cfg.security != "plain" else None
        self.live: set[ReplyCounter] = set()
        self.aborted = False
        self.result = WorkerResult()
        self._cpu0 = 0.0
        self._cpu1 = 0.0

    def more(self) -> bool:
        return not self.aborted and self.remaining > 0 and time.monotonic() < self.t_end

    def claim(self) -> bool:
        """Take one message to send, if the run is not over."""
        if not self.more():
            return False
        self.remaining -= 1
        return True

    async def run(self) -> WorkerResult:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        loop.call_later(max(0.0, self.t_start - now), self._cpu_start)
        loop.call_later(max(0.0, self.t_end - now), self._cpu_end)
        tasks = [loop.create_task(self._slot()) for _ in range(self.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=self.t_end + self.cfg.grace - now)
        if pending:  # the server stopped answering: give up on what is in flight
            self.aborted = True
            for proto in list(self.live):
                proto.abort()
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5)
            self.result.errors["aborted"] += len(pending)
        self.result.exhausted = self.remaining == 0
        self.result.cpu_s = (self._cpu1 or time.process_time()) - self._cpu0
        return self.result

    def _cpu_start(self) -> None:
        self._cpu0 = time.process_time()

    def _cpu_end(self) -> None:
        self._cpu1 = time.process_time()

    async def _slot(self) -> None:
        """One concurrent session slot: sessions one after another until the run is over."""
        while self.more():
            try:
                await self._session()
            except (OSError, ssl.SSLError, SMTPReplyError, EOFError) as exc:
                self.result.errors[_error_key(exc)] += 1
                if self.more():
                    await asyncio.sleep(0.05)  # the server refused us: don't spin

    async def _open(self) -> ReplyCounter:
        """Connect and greet (see _greet); a session that fails on the way is closed again."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        implicit = self.tls if cfg.security == "tls" else None
        _, proto = await loop.create_connection(ReplyCounter, cfg.host, cfg.port, ssl=implicit)
        self.live.add(proto)
        try:
            await self._greet(proto)
        except BaseException:
            self.live.discard(proto)
            proto.abort()
            raise
        return proto

    async def _greet(self, proto: ReplyCounter) -> None:
        """Greeting, EHLO, then STARTTLS and AUTH as configured; decide on pipelining."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        await expect(proto, "greeting", 220)
        caps = await ehlo(proto)
        if cfg.security == "starttls":
            if b"STARTTLS" not in caps:
                raise SMTPReplyError("STARTTLS-not-offered", 0)
            proto.write(b"STARTTLS\r\n")
            await expect(proto, "STARTTLS", 220)
            assert proto.transport is not None and self.tls is not None
            proto.transport = await loop.start_tls(
                proto.transport, proto, self.tls, server_hostname=cfg.host
            )
            caps = await ehlo(proto)
        if self.auth:
            proto.write(self.auth)
            await expect(proto, "AUTH", 235)
        proto.pipelining = cfg.pipelining == "on" or (
            cfg.pipelining == "auto" and b"PIPELINING" in caps
        )

    async def _session(self) -> None:
        proto = await self._open()
        try:
            sent = 0
            limit = self.cfg.per_connection or _NO_LIMIT
            while sent < limit and self.claim():
                sent += 1
                if not await self._transaction(proto):
                    proto.write(b"RSET\r\n")
                    await proto.replies(1)
            proto.write(b"QUIT\r\n")
            await proto.replies(1)
        finally:
            self.live.discard(proto)
            if proto.transport is not None:
                proto.transport.close()

    async def _envelope(self, proto: ReplyCounter) -> list[int]:
        """Send MAIL, RCPTs and DATA; return their reply codes (fewer if MAIL failed)."""
        blobs = self.blobs
        if proto.pipelining:
            proto.write(blobs.envelope)
            return await proto.replies(blobs.rcpts + 2)
        codes: list[int] = []
        for cmd in blobs.commands:
            if codes and codes[0] != 250:
                break  # MAIL failed: no point in RCPT or DATA
            proto.write(cmd)
            codes += await proto.replies(1)
        return codes

    async def _transaction(self, proto: ReplyCounter) -> bool:
        """One message; True when the server accepted it."""
        errors = self.result.errors
        codes = await self._envelope(proto)
        for code in codes:
            if code >= 400:
                errors[str(code)] += 1
        if codes[-1] != 354:
            return False
        sent_at = time.monotonic()
        proto.write(self.blobs.body)
        (final,) = await proto.replies(1)
        done = time.monotonic()
        if final != 250:
            errors[str(final)] += 1
            return False
        if self.t_start <= done <= self.t_end:
            self.result.ok += 1
            self.result.latencies.append(done - sent_at)
            self.result.last_done = done
        return True


def _run_async(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop  # optional: about half asyncio's CPU per message

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def _worker(
    cfg: LoadConfig, concurrency: int, messages: int, t_start: float, t_end: float
) -> WorkerResult:
    raise_fd_limit()
    return _run_async(_Load(cfg, concurrency, messages, t_start, t_end).run)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(
    cfg: LoadConfig, server_pid: int | None = None, server_tree: bool = False
) -> LoadResult:
    """
    Run one load and return the merged result (blocks until the run is over). With
    ``server_tree``, the server's CPU and memory include its child processes.
    """
    processes = max(1, min(cfg.processes, cfg.concurrency))
    concurrency = _split(cfg.concurrency, processes)
    messages = _split(cfg.messages, processes) if cfg.messages else [0] * processes
    # Forked workers need a moment to start: give them a common start line.
    t_start = time.monotonic() + (0.3 if processes > 1 else 0.0) + cfg.warmup
    t_end = t_start + cfg.duration
    monitor = ServerMonitor(server_pid, t_start, t_end, tree=server_tree) if server_pid else None
    if processes == 1:
        if monitor:
            monitor.start()
        results = [_worker(cfg, concurrency[0], messages[0], t_start, t_end)]
    else:
        with ProcessPoolExecutor(processes, mp_context=get_context("fork")) as pool:
            futures = [
                pool.submit(_worker, cfg, c, m, t_start, t_end)
                for c, m in zip(concurrency, messages, strict=True)
            ]
            if monitor:  # after the fork: never fork with a thread running
                monitor.start()
            results = [f.result() for f in futures]
    usage = monitor.finish() if monitor else None
    return _merge(cfg, results, t_start, t_end, usage)


def _merge(
    cfg: LoadConfig,
    results: list[WorkerResult],
    t_start: float,
    t_end: float,
    usage: ServerUsage | None,
) -> LoadResult:
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for r in results:
        errors.update(r.errors)
        latencies.extend(r.latencies)
    latencies.sort()
    if all(r.exhausted for r in results):
        end = max((r.last_done for r in results), default=t_start)
    else:
        end = t_end
    return LoadResult(
        config=cfg,
        ok=sum(r.ok for r in results),
        errors=dict(errors),
        window_s=max(0.0, min(end, t_end) - t_start),
        p50_ms=1000 * _percentile(latencies, 0.50),
        p99_ms=1000 * _percentile(latencies, 0.99),
        loadgen_cpu_s=[r.cpu_s for r in results],
        server=usage,
    )


async def _hold_idle(
    cfg: LoadConfig, count: int, server_pid: int | None, settle: float, tree: bool = False
) -> IdleResult:
    memory = tree_pss_kib if tree else rss_kib
    load = _Load(replace(cfg, user=None), 0, 0, 0.0, 0.0)
    before = memory(server_pid) if server_pid else 0
    gate = asyncio.Semaphore(100)  # connect in bursts the listen backlog can take
    errors: Counter[str] = Counter()

    async def open_one() -> None:
        async with gate:
            try:
                await load._open()
            except (OSError, ssl.SSLError, SMTPReplyError, EOFError) as exc:
                errors[_error_key(exc)] += 1

    opening = asyncio.gather(*(open_one() for _ in range(count)))
    try:
        await asyncio.wait_for(opening, timeout=cfg.grace + count / 100)
    except TimeoutError:
        errors["timeout"] += 1
    await asyncio.sleep(settle)
    held = len(load.live)
    after = memory(server_pid) if server_pid else 0
    for proto in list(load.live):
        proto.abort()
    await asyncio.sleep(0.1)
    return IdleResult(count, held, dict(errors), before, after)


def hold_idle(
    cfg: LoadConfig,
    count: int,
    server_pid: int | None = None,
    settle: float = 1.0,
    tree: bool = False,
) -> IdleResult:
    """Open ``count`` sessions (greeting, EHLO, STARTTLS if configured), hold, measure, close.
    With ``tree``, the server's memory is its whole process tree's (PSS)."""
    raise_fd_limit()
    return _run_async(lambda: _hold_idle(cfg, count, server_pid, settle, tree))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = LoadConfig()
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--security", choices=SECURITIES, default=d.security)
    p.add_argument("--user", help="AUTH PLAIN as this user; password from $LOADGEN_PASSWORD")
    p.add_argument("--size", type=int, default=d.size, help="message size in bytes")
    p.add_argument("--rcpts", type=int, default=d.rcpts)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument(
        "--per-connection", type=int, default=d.per_connection, help="0: persistent sessions"
    )
    p.add_argument("--messages", type=int, default=d.messages, help="cap; 0: none")
    p.add_argument("--duration", type=float, default=d.duration)
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--pipelining", choices=("auto", "on", "off"), default=d.pipelining)
    p.add_argument("--processes", type=int, default=d.processes)
    p.add_argument("--server-pid", type=int, help="measure this process's CPU and RSS")
    p.add_argument("--idle", type=int, metavar="N", help="hold N idle sessions instead")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = LoadConfig(
        host=args.host,
        port=args.port,
        security=args.security,
        user=args.user,
        password=os.environ.get("LOADGEN_PASSWORD", ""),
        size=args.size,
        rcpts=args.rcpts,
        concurrency=args.concurrency,
        per_connection=args.per_connection,
        messages=args.messages,
        duration=args.duration,
        warmup=args.warmup,
        pipelining=args.pipelining,
        processes=args.processes,
    )
    if args.idle:
        idle = hold_idle(cfg, args.idle, args.server_pid)
        out: dict[str, Any] = {**asdict(idle), "kib_per_conn": idle.kib_per_conn}
    else:
        out = run_load(cfg, args.server_pid).summary()
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>22}: {value}")
    return 1 if out.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
