"""
Instructions per accepted message: mailrelay's intake under ``valgrind --tool=callgrind``.

A VM's speed wanders by a fifth from one minute to the next, which hides a change of a few per
cent in the rates and CPU times the other benchmarks report. Callgrind counts the instructions
the relay executes instead, which repeat within about 2 % from run to run whatever else the
machine does; use it to compare two trees (``--tree``), and the other benchmarks for speed.

One relay process (``workers = 1``, the SQLite store, ``[delivery] mode = "hold"``) runs under
callgrind on a relay-by-IP listener. Postfix's ``smtp-source`` sends ``--warmup`` messages,
then callgrind's counters are zeroed, ``--messages`` more are sent (2 KiB, ``--sessions`` at
once, one message per session at a time, as ``smtp-source`` does), and the counters are dumped.
The result is the count over the measured messages: every thread of the process, the store's
writer included. Nothing is appended to RESULTS.md; the command and its figures go there by
hand when they are a result.

``--side delivery`` counts the way out instead. The relay queues ``--messages`` while nothing
leaves, then stops; the operator's hold (``mailrelay queue hold --account``) keeps them from
being due, and the relay starts again under callgrind, delivering by smarthost to Postfix's
``smtp-sink``. Once it serves, the counters are zeroed, ``mailrelay queue release`` lets the
messages go, and the counters are dumped when the sink has them all. (No warm-up: the pool's
first connections are part of the count.)

    python -m benchmarks.instructions                         # this tree
    python -m benchmarks.instructions --tree /tmp/other-tree  # another (its extension built)
    python -m benchmarks.instructions --side delivery
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import adapters
from benchmarks.certs import make_cert
from benchmarks.e2e import MAILRELAY_DELIVERY, SINK, Sink
from benchmarks.smtpsource import SMTP_SOURCE

SENDER = "load@bench.example"
_TOTALS = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def _smtpSource(port: int, messages: int, sessions: int) -> None:
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", "2048", "-d"]
    cmd += ["-f", SENDER, "-t", "user0@example.com", "-M", "loadgen.bench.local"]
    subprocess.run([*cmd, f"127.0.0.1:{port}"], check=True, timeout=1800)


def _loadgenStartTLS(port: int, messages: int, sessions: int) -> None:
    """The project's load generator over STARTTLS with AUTH PLAIN (``smtp-source`` has no
    TLS), pipelining as the relay offers it."""
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--port", str(port)]
    cmd += ["--security", "starttls", "--user", adapters.USER, "--size", "2048"]
    cmd += ["--concurrency", str(sessions), "--messages", str(messages)]
    cmd += ["--duration", "3600", "--warmup", "0"]
    env = {**os.environ, "LOADGEN_PASSWORD": adapters.PASSWORD}
    subprocess.run(cmd, check=True, timeout=1800, cwd=adapters.REPO, env=env, capture_output=True)


def _callgrindControl(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True)


def _cli(tree: Path, config: Path, *args: str, stdin: bytes = b"") -> None:
    """The admin command line of ``tree`` on ``config``."""
    cmd = [sys.executable, "-m", "mailrelay.cli", "--config", str(config), *args]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(cmd, input=stdin, cwd=tree, env=env, check=True, capture_output=True)


def _configure(tree: Path, workdir: Path) -> tuple[Path, dict[str, int]]:
    """Write the relay's configuration (``[delivery] mode = "hold"``) and account; returns
    (config, its ports)."""
    cert, key = make_cert(workdir)
    ports = {name: adapters.free_port() for name in adapters.MAILRELAY_PORTS}
    config = workdir / "mailrelay.toml"
    config.write_text(adapters.mailrelay_config(workdir, cert, key, ports))
    password = adapters.PASSWORD.encode()
    _cli(tree, config, "account", "add", adapters.USER, "--password-stdin", stdin=password)
    _cli(tree, config, "sender", "add", adapters.USER, "bench.example")
    _cli(tree, config, "account", "set", adapters.USER, "--networks", "127.0.0.0/8")
    return config, ports


def _relayCommand(config: Path, callgrindOut: Path | None) -> list[str]:
    """``twistd -n mailrelay`` on ``config``, under callgrind if it is to write ``callgrindOut``."""
    twistd = Path(sys.executable).with_name("twistd")
    cmd = [sys.executable, str(twistd), "-n", "--pidfile=", "mailrelay", "--config", str(config)]
    if callgrindOut is None:
        return cmd
    return [
        *("valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrindOut}"),
        *("--dump-instr=no", "--dump-line=no", *cmd),
    ]


def _exited(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is not None


def _dumped(workdir: Path, log: Path) -> int:
    """The instructions of callgrind's dumps in ``workdir``, every thread's."""
    totals = [_TOTALS.search(path.read_bytes()) for path in workdir.glob("callgrind.out.*")]
    if not totals or None in totals:
        raise RuntimeError(f"callgrind wrote no complete dump; see {log}")
    return sum(int(found.group(1)) for found in totals if found is not None)


def countInstructions(
    tree: Path, messages: int, sessions: int, warmup: int, security: str = "plain"
) -> int:
    """The instructions the relay ran for ``messages`` accepted messages (see the module)."""
    with tempfile.TemporaryDirectory(prefix="mailrelay-callgrind-") as name:
        workdir = Path(name)
        config, ports = _configure(tree, workdir)
        port = ports[security]
        send = _smtpSource if security == "plain" else _loadgenStartTLS
        env = {**os.environ, "PYTHONPATH": str(tree)}
        log = workdir / "relay.log"
        proc = adapters._spawn(
            _relayCommand(config, workdir / "callgrind.out"), log, cwd=tree, env=env
        )
        try:
            serving = [ports["plain"], port] if port != ports["plain"] else [port]
            adapters.wait_until_serving(_exited(proc), serving, log, 300)
            send(port, warmup, sessions)
            time.sleep(2)  # what the warm-up left to finish (commits, log lines)
            _callgrindControl("-z", proc.pid)  # zero the counters
            send(port, messages, sessions)
            time.sleep(1)
            _callgrindControl("-d", proc.pid)  # dump them
        finally:
            adapters._terminate(proc)
        return _dumped(workdir, log)


def countDeliveryInstructions(tree: Path, messages: int, sessions: int) -> int:
    """The instructions the relay ran to deliver ``messages`` queued messages to a sink (see
    the module)."""
    with tempfile.TemporaryDirectory(prefix="mailrelay-callgrind-") as name:
        workdir = Path(name)
        config, ports = _configure(tree, workdir)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        log = workdir / "relay.log"
        proc = adapters._spawn(_relayCommand(config, None), log, cwd=tree, env=env)
        try:
            adapters.wait_until_serving(_exited(proc), [ports["plain"]], log, 300)
            _smtpSource(ports["plain"], messages, sessions)
        finally:
            adapters._terminate(proc)
        _cli(tree, config, "queue", "hold", "--account", adapters.USER)
        sink = Sink(workdir)
        held = config.read_text().split("[delivery]")[0]
        config.write_text(held + MAILRELAY_DELIVERY.format(sink=sink.port))
        log = workdir / "delivering.log"
        proc = adapters._spawn(
            _relayCommand(config, workdir / "callgrind.out"), log, cwd=tree, env=env
        )
        try:
            adapters.wait_until_serving(_exited(proc), [ports["plain"]], log, 300)
            time.sleep(2)  # what starting left to finish
            _callgrindControl("-z", proc.pid)
            _cli(tree, config, "queue", "release", "--account", adapters.USER)
            deadline = time.monotonic() + 1800
            while sink.count() < messages and time.monotonic() < deadline:
                time.sleep(0.5)
            if sink.count() < messages:
                raise RuntimeError(f"{sink.count()} of {messages} delivered; see {log}")
            time.sleep(1)  # the outcomes' writes
            _callgrindControl("-d", proc.pid)
        finally:
            adapters._terminate(proc)
            sink.stop()
        return _dumped(workdir, log)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", type=Path, default=adapters.REPO, help="the source tree to run")
    p.add_argument("--messages", type=int, default=1000, help="messages counted")
    p.add_argument("--sessions", type=int, default=10, help="smtp-source sessions at once")
    p.add_argument("--warmup", type=int, default=200, help="messages sent before counting")
    p.add_argument("--runs", type=int, default=2, help="counts to make, one after another")
    p.add_argument(
        "--side",
        choices=("intake", "delivery"),
        default="intake",
        help="intake: messages accepted; delivery: messages queued, then delivered to "
        "smtp-sink by smarthost",
    )
    p.add_argument(
        "--security",
        choices=("plain", "starttls"),
        default="plain",
        help="plain: smtp-source on the relay-by-IP listener; starttls: the load generator "
        "with STARTTLS and AUTH PLAIN",
    )
    args = p.parse_args()
    for tool in ("valgrind", "callgrind_control", SMTP_SOURCE, SINK):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 1
    tree = args.tree.resolve()
    for _ in range(args.runs):
        if args.side == "delivery":
            total = countDeliveryInstructions(tree, args.messages, args.sessions)
        else:
            total = countInstructions(
                tree, args.messages, args.sessions, args.warmup, args.security
            )
        print(f"{tree}: {total / args.messages:,.0f} instructions per message", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
