"""
A claim's wait for the GIL: the SQLite store's claim of 50 due entries, on a database thread
as the relay runs it, with the reactor thread idle and with it running Python without a pause.

The writer thread lets go of the GIL for every SQLite call (each statement, each row read) and
then waits for the thread holding it to give it back, up to a switch interval (the relay sets
1 ms). A delivering relay's reactor thread runs Python most of the time, so what a claim costs
there depends on how many times it lets go, more than on its own work. The busy case is the
worst case: the scale benchmark's claims while delivering fall between the two.

The file holds 20,000 queued notifications of one recipient and a 2 KiB body each; every claim
is rolled back, so each claims the same 50.

    python -m benchmarks.claim_contention                     # this tree
    python -m benchmarks.claim_contention --tree /tmp/other   # another tree's store code
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

ENTRIES = 20_000
CLAIM = 50
BODY_SIZE = 2048
SWITCH_INTERVAL = 0.001  # as mailrelay.core sets it
NOW = 1_800_000_000_000


def _fill(path: Path) -> sqlite3.Connection:
    from mailrelay.store.sqlite.migrate import schemaScripts, statements

    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for _, script in schemaScripts():
        for statement in statements(script):
            connection.execute(statement)
    connection.execute(f"PRAGMA user_version = {schemaScripts()[-1][0]:d}")
    recipients = '[["a@x.example", "email"]]'
    body = os.urandom(BODY_SIZE)
    connection.execute("BEGIN")
    for n in range(1, ENTRIES + 1):
        connection.execute(
            "INSERT INTO notifications (id, account, sender, size, received_at, "
            "notify_content_type, recipient_list) VALUES (?, 'acme', 's@acme.example', ?, ?, "
            "'text/plain', ?)",
            (n, BODY_SIZE, NOW, recipients),
        )
        connection.execute("INSERT INTO messages (notification_id, body) VALUES (?, ?)", (n, body))
        connection.execute(
            "INSERT INTO queue (notification_id, state, next_attempt) VALUES (?, 'queued', ?)",
            (n, NOW - ENTRIES + n),
        )
    connection.execute("COMMIT")
    return connection


def _timeClaims(connection: sqlite3.Connection, rounds: int) -> list[float]:
    """Seconds each of ``rounds`` claims took on a thread of its own."""
    from mailrelay.store.sqlite.delivery import _claimEntries, _claimOldestDue

    claim = partial(_claimEntries, now=NOW, leaseUntil=NOW + 60_000)
    took: list[float] = []

    def run() -> None:
        for _ in range(rounds):
            started = time.perf_counter()
            connection.execute("BEGIN IMMEDIATE")
            claimed, _ = _claimOldestDue(connection, CLAIM, NOW, claim)
            connection.execute("ROLLBACK")
            took.append(time.perf_counter() - started)
            assert len(claimed) == CLAIM, len(claimed)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return sorted(took)


def _busy(stop: threading.Event) -> None:
    total = 0
    while not stop.is_set():
        for i in range(1000):
            total += i


def measure(rounds: int) -> dict[str, list[float]]:
    sys.setswitchinterval(SWITCH_INTERVAL)
    with tempfile.TemporaryDirectory() as directory:
        connection = _fill(Path(directory) / "claims.sqlite3")
        idle = _timeClaims(connection, rounds)
        stop = threading.Event()
        reactor = threading.Thread(target=_busy, args=(stop,))
        reactor.start()
        try:
            busy = _timeClaims(connection, rounds)
        finally:
            stop.set()
            reactor.join()
        connection.close()
    return {"reactor thread idle": idle, "reactor thread busy": busy}


def _ms(took: list[float], q: float) -> str:
    from benchmarks.scale import percentile

    value = percentile(took, q)
    return "-" if value is None else f"{value * 1000:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--tree", type=Path, help="the tree whose store code to measure")
    args = parser.parse_args()
    if args.tree is not None:
        env = {**os.environ, "PYTHONPATH": str(args.tree.resolve())}
        command = [sys.executable, __file__, "--rounds", str(args.rounds)]
        sys.exit(subprocess.run(command, env=env, cwd=args.tree, check=False).returncode)
    print(f"claims of {CLAIM} from {ENTRIES:,} queued, {args.rounds} each\n")
    print("| reactor thread | p50 | p99 |\n|---|--:|--:|")
    for case, took in measure(args.rounds).items():
        print(f"| {case.split()[-1]} | {_ms(took, 0.5)} | {_ms(took, 0.99)} |")


if __name__ == "__main__":
    main()
