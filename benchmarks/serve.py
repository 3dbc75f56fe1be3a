"""
Start one of the runner's servers, as the runner would (same configuration, same account), and
keep it until Ctrl-C or SIGTERM: for driving it by hand with ``benchmarks.loadgen`` and
profiling it with ``py-spy``, say. Prints one JSON line: the server's pid, its listeners'
ports and its log file. Its data goes to a temporary directory, removed at the end.

    python -m benchmarks.serve mailrelay-sqlite
    {"server": "mailrelay-sqlite", "pid": 4242, "plain": 40001, ...}
    python -m benchmarks.loadgen --port 40001 --size 102400 --server-pid 4242
    py-spy record --pid 4242 --duration 10 --output profile.svg
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks import adapters
from benchmarks.certs import make_cert
from benchmarks.loadgen import raise_fd_limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("server", choices=sorted(adapters.ALL))
    parser.add_argument("--keep", type=Path, help="put the server's data here and keep it")
    args = parser.parse_args(argv)
    adapter = adapters.ALL[args.server]
    if reason := adapter.unavailable():
        print(f"{args.server} is not available: {reason}", file=sys.stderr)
        return 1
    raise_fd_limit()  # the server inherits it
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="mailrelay-serve-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # Postfix's unprivileged daemons must reach their data directory
        cert, key = make_cert(workdir)
        running = adapter.start(workdir, cert, key)
        try:
            info: dict[str, Any] = {"server": running.name, "pid": running.pid}
            info |= {name: listener.port for name, listener in running.listeners.items()}
            info["log"] = str(running.log_path)
            print(json.dumps(info), flush=True)
            stop.wait()
        finally:
            running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
