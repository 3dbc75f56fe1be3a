"""
A profiling probe for the SQLite store's writer thread, never a way to run the relay: with this
directory on ``PYTHONPATH``, a ``twistd ... mailrelay`` process logs, every few seconds, what
its group-commit writer did per commit group:

    writerstats: 3.0 s, 1,267 groups, 4.73 msgs/group; per group (us): idle 43, run 2,272
    (bodies 982, rows 773, commit and the rest 517); reply hop 233

``idle``: waiting for the first request of a group. ``run``: the group from start to end,
split into the segment write of the large bodies, the row inserts, and the rest, which is
mostly ``BEGIN``/``COMMIT`` (the WAL write and fsync). ``reply hop``: from the
writer handing the outcomes to the reactor until the reactor runs them. All are wall-clock
times, GIL waits included. Other processes (the runner, the load generator, the baseline
servers) import this module too and are left alone.

    PYTHONPATH=benchmarks/probes/writerstats python -m benchmarks.run \\
        --servers mailrelay-sqlite --scenario 100k-r1-c10-persist-plain --keep /tmp/bench
    grep writerstats /tmp/bench/*/mailrelay-sqlite.log
"""

from __future__ import annotations

import sys
import time
from typing import Any

INTERVAL = 3.0


def _install() -> None:
    from mailrelay.store.sqlite import bodies, queue, threads

    totals: dict[str, float] = {}
    started = [time.perf_counter()]

    def add(name: str, seconds: float) -> None:
        totals[name] = totals.get(name, 0.0) + seconds

    def report() -> None:
        now = time.perf_counter()
        elapsed, groups = now - started[0], totals.get("groups", 0)
        if elapsed < INTERVAL or not groups:
            return
        per = {k: v / groups * 1e6 for k, v in totals.items()}
        run, bodiesTime, rows = per.get("run", 0), per.get("bodies", 0), per.get("rows", 0)
        hops = totals.get("hops", 0) or 1
        sys.stderr.write(
            f"writerstats: {elapsed:.1f} s, {groups:,.0f} groups, "
            f"{totals.get('messages', 0) / groups:.2f} msgs/group; per group (us): "
            f"idle {per.get('idle', 0):,.0f}, run {run:,.0f} (bodies {bodiesTime:,.0f}, "
            f"rows {rows - bodiesTime:,.0f}, commit and the rest {run - rows:,.0f}); "
            f"reply hop {totals.get('hop', 0) / hops * 1e6:,.0f}\n"
        )
        totals.clear()
        started[0] = now

    writer = threads.GroupCommitThread
    take, execute, deliver = writer._take, writer._execute, writer._deliver
    handedOver: list[float] = []

    def timedTake(self: Any) -> Any:
        t = time.perf_counter()
        result = take(self)
        add("idle", time.perf_counter() - t)
        return result

    def timedExecute(self: Any, requests: Any) -> Any:
        t = time.perf_counter()
        result = execute(self, requests)
        add("run", time.perf_counter() - t)
        add("groups", 1)
        add("messages", len(requests))
        report()
        handedOver.append(time.perf_counter())
        return result

    def timedDeliver(self: Any, outcomes: Any) -> Any:
        if handedOver:
            add("hop", time.perf_counter() - handedOver.pop(0))
            add("hops", 1)
        return deliver(self, outcomes)

    enqueueAll = queue._enqueueAll
    append = bodies.SegmentWriter.append

    def timedEnqueueAll(connection: Any, works: Any) -> Any:
        t = time.perf_counter()
        result = enqueueAll(connection, works)
        add("rows", time.perf_counter() - t)  # the bodies included: subtracted in the report
        return result

    def timedAppend(self: Any, bodyList: Any) -> Any:
        t = time.perf_counter()
        result = append(self, bodyList)
        add("bodies", time.perf_counter() - t)
        return result

    writer._take = timedTake  # type: ignore[method-assign]
    writer._execute = timedExecute  # type: ignore[method-assign]
    writer._deliver = timedDeliver  # type: ignore[method-assign]
    queue._enqueueAll = timedEnqueueAll
    bodies.SegmentWriter.append = timedAppend  # type: ignore[method-assign]
    sys.stderr.write("writerstats: timing the SQLite writer thread (benchmark probe)\n")


if "mailrelay" in sys.argv and sys.argv[0].endswith("twistd"):
    _install()
