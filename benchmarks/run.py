"""
Run every server under test through the same scenarios, one after another, and print a table.

    python -m benchmarks.run --quick      # smoke run, well under a minute
    python -m benchmarks.run              # the full run (about 10 minutes)

Each (scenario, server) pair gets a freshly started server, so no run inherits another's
memory or queue. Results go to stdout as markdown and are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import adapters, smtpsource
from benchmarks.certs import make_cert
from benchmarks.loadgen import (
    IdleResult,
    LoadConfig,
    LoadResult,
    hold_idle,
    raise_fd_limit,
    run_load,
)
from benchmarks.report import Row, document
from benchmarks.scenarios import FULL, QUICK, Scenario
from benchmarks.smtpsource import SourceResult, run_smtp_source

RESULTS = Path(__file__).with_name("RESULTS.md")
DEFAULT_SERVERS = [
    "twisted-plain",
    "aiosmtpd",
    "mailrelay-sqlite",
    "mailrelay-sqlite-2w",
    "mailrelay-redis",
    "mailrelay-redis-2w",
    "postfix",
]


def measure(server: adapters.RunningServer, scenario: Scenario, args: argparse.Namespace) -> Row:
    """Drive one running server through one scenario."""
    security = "plain" if scenario.idle else scenario.security
    listener = server.listeners[security]
    cfg = LoadConfig(
        host=listener.host,
        port=listener.port,
        security=security,
        user=listener.user,
        password=listener.password,
        size=scenario.size_kib * 1024,
        rcpts=scenario.rcpts,
        concurrency=scenario.concurrency,
        per_connection=0 if scenario.persistent else 1,
        duration=args.duration,
        warmup=args.warmup,
        processes=args.loadgen_processes,
    )
    if scenario.idle:
        return Row(
            scenario, server.name, hold_idle(cfg, scenario.idle, server.pid, tree=server.tree)
        )
    return Row(scenario, server.name, run_load(cfg, server.pid, server.tree))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 short scenarios (smoke test)")
    p.add_argument(
        "--scenario",
        action="append",
        type=Scenario.parse,
        help="run this scenario (repeatable), e.g. 100k-r50-c500-1per-starttls or idle5000",
    )
    p.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated, from: {', '.join(adapters.ALL)}",
    )
    p.add_argument("--duration", type=float, help="measurement window per run, s")
    p.add_argument("--warmup", type=float, help="warm-up before each window, s")
    p.add_argument("--loadgen-processes", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="run each pair N times, keep the best")
    p.add_argument(
        "--smtp-source",
        action=argparse.BooleanOptionalAction,
        help="also drive every server with Postfix's smtp-source "
        "(default: in full runs, where it is installed)",
    )
    p.add_argument("--smtp-source-messages", type=int, default=5000)
    p.add_argument(
        "--smtp-source-sessions",
        type=_counts,
        default=[10],
        metavar="N[,N...]",
        help="smtp-source's parallel sessions, one run per count (default: 10), e.g. "
        "100,250,400,500 for the concurrency cliff",
    )
    p.add_argument(
        "--smtp-source-mode",
        choices=("both", "persist", "1per"),
        default="both",
        help="persistent sessions (-d), one message per connection, or both (default)",
    )
    p.add_argument(
        "--smtp-source-only",
        action="store_true",
        help="run only smtp-source (implies --smtp-source): no load generator scenarios",
    )
    p.add_argument("--keep", type=Path, metavar="DIR", help="keep server logs and data here")
    p.add_argument("--no-record", action="store_true", help="don't append to RESULTS.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    scenarios = args.scenario or (QUICK if args.quick else FULL)
    if args.smtp_source_only:
        scenarios, args.smtp_source = [], True
    if args.duration is None:
        args.duration = 1.5 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.smtp_source is None:
        args.smtp_source = not args.quick and smtpsource.available()
    raise_fd_limit()  # servers inherit it: the idle scenarios need thousands of descriptors
    notes: list[str] = []
    servers = []
    for name in args.servers.split(","):
        adapter = adapters.ALL[name]
        if reason := adapter.unavailable():
            notes.append(f"{name} skipped: {reason}")
            print(f"skipping {name}: {reason}", file=sys.stderr)
        else:
            servers.append(adapter)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mailrelay-bench-") as tmp:
        base = args.keep or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # Postfix's unprivileged daemons must reach their data directory
        cert, key = make_cert(base)
        for scenario in scenarios:
            tries: dict[str, list[Row]] = {adapter.name: [] for adapter in servers}
            for adapter in plan(servers, args.repeat):
                workdir = base / f"{scenario.name}-{adapter.name}"
                shutil.rmtree(workdir, ignore_errors=True)  # fresh state, also under --keep
                workdir.mkdir()
                print(f"{scenario.name} on {adapter.name} ...", file=sys.stderr, flush=True)
                tries[adapter.name].append(_one(adapter, scenario, workdir, cert, key, args))
            rows.extend(_best(each) for each in tries.values())

        sources = _smtp_source_runs(servers, base, cert, key, args) if args.smtp_source else []

    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = document(rows, command.strip(), notes, sources)
    print(text)
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
    return 0


def _counts(text: str) -> list[int]:
    """``100,250,400`` as [100, 250, 400]: positive whole numbers."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not N[,N...]: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not positive counts: {text!r}")
    return counts


def plan(servers: list[adapters.ServerAdapter], repeat: int) -> list[adapters.ServerAdapter]:
    """
    The order of one scenario's runs: every server once, then every server again, ``repeat``
    rounds. A slow spell on a shared machine then costs each server one try alike, rather than
    all of one server's tries (the best of them is kept).
    """
    return [adapter for _ in range(repeat) for adapter in servers]


def _smtp_source_runs(
    servers: list[adapters.ServerAdapter],
    base: Path,
    cert: Path,
    key: Path,
    args: argparse.Namespace,
) -> list[SourceResult]:
    """Postfix's smtp-source against every server's plain listener, persistent and/or not
    (``--smtp-source-mode``), at each of ``--smtp-source-sessions``."""
    results = []
    modes = {"both": (True, False), "persist": (True,), "1per": (False,)}[args.smtp_source_mode]
    runs = [(persistent, n) for persistent in modes for n in args.smtp_source_sessions]
    for persistent, sessions in runs:
        scenario = Scenario(concurrency=sessions, persistent=persistent)
        for adapter in servers:
            if adapter.skip(scenario):
                continue
            workdir = base / f"smtp-source-{scenario.name}-{adapter.name}"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            print(f"smtp-source {scenario.name} on {adapter.name} ...", file=sys.stderr, flush=True)
            try:
                server = adapter.start(workdir, cert, key)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                print(f"  could not start: {exc}", file=sys.stderr)
                continue
            try:
                result = run_smtp_source(
                    adapter.name,
                    server.listeners["plain"],
                    server.pid,
                    sessions=sessions,
                    messages=args.smtp_source_messages,
                    persistent=persistent,
                    tree=server.tree,
                )
            finally:
                server.stop()
            print(
                f"  {result.msgs_per_s:,.0f} msgs/s, listen overflows "
                f"{result.listen_overflows} {result.failure}",
                file=sys.stderr,
            )
            results.append(result)
    return results


def _best(tries: list[Row]) -> Row:
    """The fastest try (other work on the machine only ever slows a run down)."""

    def score(row: Row) -> float:
        if isinstance(row.result, LoadResult):
            return row.result.msgs_per_s
        if isinstance(row.result, IdleResult) and row.result.kib_per_conn is not None:
            return -row.result.kib_per_conn
        return float("-inf")

    return max(tries, key=score)


def _one(
    adapter: adapters.ServerAdapter,
    scenario: Scenario,
    workdir: Path,
    cert: Path,
    key: Path,
    args: argparse.Namespace,
) -> Row:
    if reason := adapter.skip(scenario):
        return Row(scenario, adapter.name, failure=reason)
    try:
        server = adapter.start(workdir, cert, key)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"  could not start: {exc}", file=sys.stderr)
        return Row(scenario, adapter.name, failure="failed: did not start")
    try:
        row = measure(server, scenario, args)
    finally:
        server.stop()
    if row.result is not None and (rate := getattr(row.result, "msgs_per_s", None)) is not None:
        print(f"  {rate:,.0f} msgs/s, errors {row.result.errors}", file=sys.stderr)
    return row


if __name__ == "__main__":
    sys.exit(main())
