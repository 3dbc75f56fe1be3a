"""Markdown tables of a run, with each result's ratio to the plain Twisted server."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import twisted
from benchmarks.loadgen import IdleResult, LoadResult
from benchmarks.scenarios import Scenario
from benchmarks.smtpsource import SourceResult

REFERENCE = "twisted-plain"


@dataclass
class Row:
    scenario: Scenario
    server: str
    result: LoadResult | IdleResult | None = None
    failure: str = ""


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))


def _ratio(value: float | None, reference: float | None) -> str:
    if not value or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def _reference(rows: list[Row], scenario: Scenario) -> Row | None:
    for row in rows:
        if row.scenario == scenario and row.server == REFERENCE and row.result is not None:
            return row
    return None


def load_table(rows: list[Row]) -> str:
    head = (
        "| scenario | server | msgs/s | vs twisted | p50 ms | p99 ms | srv CPU s/1k msgs "
        "| srv CPU % | peak RSS MiB | loadgen CPU % | other CPU % | errors |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n"
    )
    lines = []
    for row in rows:
        if row.scenario.idle:
            continue
        res = row.result
        if not isinstance(res, LoadResult):
            lines.append(f"| {row.scenario.name} | {row.server} | {row.failure} |" + " |" * 9)
            continue
        ref = _reference(rows, row.scenario)
        ref_rate = ref.result.msgs_per_s if ref and isinstance(ref.result, LoadResult) else None
        srv = res.server
        cpu_1k = f"{res.server_cpu_per_1k:.3f}" if res.server_cpu_per_1k is not None else "-"
        cpu_pct = f"{100 * srv.cpu_s / res.window_s:.0f}" if srv and res.window_s else "-"
        rss = f"{srv.peak_rss_kib / 1024:.0f}" if srv else "-"
        other = f"{res.other_cpu_pct:.0f}" if res.other_cpu_pct is not None else "-"
        lines.append(
            f"| {row.scenario.name} | {row.server} | {res.msgs_per_s:,.0f} "
            f"| {_ratio(res.msgs_per_s, ref_rate)} | {res.p50_ms:.2f} | {res.p99_ms:.2f} "
            f"| {cpu_1k} | {cpu_pct} | {rss} | {res.loadgen_cpu_pct:.0f} | {other} "
            f"| {_errors(res.errors)} |"
        )
    return head + "\n".join(lines) + "\n" if lines else ""


def idle_table(rows: list[Row]) -> str:
    head = (
        "| scenario | server | held | KiB/conn | vs twisted | RSS before MiB | RSS after MiB "
        "| errors |\n|---|---|--:|--:|--:|--:|--:|---|\n"
    )
    lines = []
    for row in rows:
        if not row.scenario.idle:
            continue
        res = row.result
        if not isinstance(res, IdleResult):
            lines.append(f"| {row.scenario.name} | {row.server} | {row.failure} |" + " |" * 5)
            continue
        ref = _reference(rows, row.scenario)
        ref_kib = ref.result.kib_per_conn if ref and isinstance(ref.result, IdleResult) else None
        per = f"{res.kib_per_conn:.1f}" if res.kib_per_conn is not None else "-"
        lines.append(
            f"| {row.scenario.name} | {row.server} | {res.held:,} | {per} "
            f"| {_ratio(res.kib_per_conn, ref_kib)} | {res.rss_before_kib / 1024:.0f} "
            f"| {res.rss_after_kib / 1024:.0f} | {_errors(res.errors)} |"
        )
    return head + "\n".join(lines) + "\n" if lines else ""


def source_table(results: list[SourceResult]) -> str:
    """Postfix's smtp-source against each server (2 KiB, no pipelining), with the connections
    the kernel dropped meanwhile for a full listen queue (``listen overflows``)."""
    if not results:
        return ""
    head = (
        "| smtp-source run | server | msgs/s | vs twisted | srv CPU s/1k msgs | srv CPU % "
        "| smtp-source CPU % | other CPU % | listen overflows | result |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|\n"
    )
    lines = []
    for res in results:
        ref = next((r for r in results if r.label == res.label and r.server == REFERENCE), None)
        if res.failure or res.usage is None:
            lines.append(
                f"| {res.label} | {res.server} | - | - | - | - | - | - | - | {res.failure} |"
            )
            continue
        per_1k = res.usage.cpu_s / res.messages * 1000
        pct = 100 * res.usage.cpu_s / res.elapsed_s
        client = 100 * res.client_cpu_s / res.elapsed_s
        other = f"{res.other_cpu_pct:.0f}" if res.other_cpu_pct is not None else "-"
        ratio = _ratio(res.msgs_per_s, ref.msgs_per_s if ref else None)
        overflows = "-" if res.listen_overflows is None else f"{res.listen_overflows:,}"
        lines.append(
            f"| {res.label} | {res.server} | {res.msgs_per_s:,.0f} | {ratio} | {per_1k:.3f} "
            f"| {pct:.0f} | {client:.0f} | {other} | {overflows} | {res.messages:,} sent |"
        )
    return head + "\n".join(lines) + "\n"


def machine() -> str:
    """One line: cores, CPU model, kernel, Python, Twisted, and the commit measured."""
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return (
        f"{os.cpu_count()} cores, {model}, {memory:.0f} GiB, "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"Twisted {twisted.__version__}, commit {commit}"
    )


def document(
    rows: list[Row], command: str, notes: list[str], sources: list[SourceResult] | None = None
) -> str:
    """The markdown section for one run."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"## {when}\n", f"`{command}`\n", f"Machine: {machine()}\n"]
    tables = (load_table(rows), idle_table(rows), source_table(sources or []))
    parts += [t for t in tables if t]
    parts += [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"
