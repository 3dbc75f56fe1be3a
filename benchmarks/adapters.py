"""
How the runner starts, reaches and stops each server under test.

Every adapter turns a work directory and a certificate into a :class:`RunningServer`: a pid to
watch and one :class:`Listener` per security mode it offers (``plain``: no TLS and no AUTH,
``starttls`` and ``tls``: AUTH PLAIN over STARTTLS or implicit TLS).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
USER = "bench"
PASSWORD = "bench-password-1234"  # loopback-only throwaway account


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    user: str | None = None  # AUTH PLAIN as this user, when set
    password: str = ""


@dataclass
class RunningServer:
    name: str
    process: subprocess.Popen[bytes]
    listeners: dict[str, Listener]
    log_path: Path
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; helpers (e.g. redis) last."""
        for proc in [self.process, *self.helpers]:
            _terminate(proc)


class ServerAdapter(Protocol):
    @property
    def name(self) -> str:
        """The server's column label, e.g. ``mailrelay-sqlite``."""

    def unavailable(self) -> str | None:
        """Why this server cannot run here, or None when it can."""

    def start(self, workdir: Path, cert: Path, key: Path) -> RunningServer:
        """Start the server (fresh state under ``workdir``); return once it accepts."""


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_serving(
    proc: subprocess.Popen[bytes], ports: list[int], log_path: Path, timeout: float = 60.0
) -> None:
    """
    Poll until the first port answers with a 220 greeting and every other port accepts
    connections; raise if the server exits or is not there by ``timeout``.
    """
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting and time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", waiting[0]), 1) as s,
        ):
            # The first port must greet (the server is up); the others (TLS) just accept.
            s.settimeout(5)
            if len(waiting) < len(ports) or s.recv(512).startswith(b"220"):
                waiting.pop(0)
                continue
        time.sleep(0.1)
    if waiting:
        _terminate(proc)
        raise RuntimeError(f"port {waiting[0]} not serving within {timeout:.0f} s; see {log_path}")


def _spawn(cmd: list[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
        )


@dataclass
class BaselineScript:
    """One of ``benchmarks/servers/*.py``: three listeners, AUTH against one user."""

    name: str
    script: str

    def unavailable(self) -> str | None:
        return None

    def start(self, workdir: Path, cert: Path, key: Path) -> RunningServer:
        ports = {sec: free_port() for sec in ("plain", "starttls", "tls")}
        log_path = workdir / f"{self.name}.log"
        cmd = [
            sys.executable,
            str(REPO / "benchmarks" / "servers" / self.script),
            f"--port={ports['plain']}",
            f"--starttls-port={ports['starttls']}",
            f"--tls-port={ports['tls']}",
            f"--cert={cert}",
            f"--key={key}",
            f"--user={USER}",
            f"--password={PASSWORD}",
        ]
        proc = _spawn(cmd, log_path)
        wait_until_serving(proc, list(ports.values()), log_path)
        listeners = {
            "plain": Listener("127.0.0.1", ports["plain"]),
            "starttls": Listener("127.0.0.1", ports["starttls"], USER, PASSWORD),
            "tls": Listener("127.0.0.1", ports["tls"], USER, PASSWORD),
        }
        return RunningServer(self.name, proc, listeners, log_path)


TWISTED = BaselineScript("twisted-plain", "twisted_plain.py")
AIOSMTPD = BaselineScript("aiosmtpd", "aiosmtpd_plain.py")


MAILRELAY_CONFIG = """\
hostname = "bench.local"
data_dir = "{data_dir}"

[tls]
certificate = "{cert}"
key = "{key}"

[[listeners]]
endpoint = "tcp:{starttls}:interface=127.0.0.1:backlog=1024"
security = "starttls"

[[listeners]]
endpoint = "tcp:{tls}:interface=127.0.0.1:backlog=1024"
security = "tls"

[[listeners]]
endpoint = "tcp:{plain}:interface=127.0.0.1:backlog=1024"
security = "none"
auth = "network"

[web]
endpoint = "tcp:{web}:interface=127.0.0.1"

[store]
backend = "{backend}"
{store_extra}
[limits]
max_recipients = 1000

[delivery]
mode = "hold"   # measure intake: accepted messages stay queued, no outbound traffic
"""


@dataclass
class Mailrelay:
    """
    mailrelay under ``twistd -n``: STARTTLS and implicit-TLS listeners with AUTH, and a
    relay-by-IP (``auth = "network"``) listener for the plain scenarios. One account
    (``bench``, sender domain ``bench.example``, networks 127.0.0.0/8) is set up with the
    admin CLI before the server starts.
    """

    backend: str = "sqlite"

    @property
    def name(self) -> str:
        return f"mailrelay-{self.backend}"

    def unavailable(self) -> str | None:
        for part in ("mailrelay/cli.py", "mailrelay/tap.py"):
            if not (REPO / part).exists():
                return f"{part} does not exist yet"
        if self.backend == "redis":
            if not (REPO / "mailrelay" / "store" / "redis").exists():
                return "mailrelay has no redis store yet"
            if not shutil.which("redis-server"):
                return "redis-server is not installed"
        return None

    def _cli(self, config: Path, *args: str, stdin: bytes = b"") -> None:
        cmd = [sys.executable, "-m", "mailrelay.cli", "--config", str(config), *args]
        done = subprocess.run(
            cmd, input=stdin, capture_output=True, cwd=REPO, timeout=60, check=False
        )
        if done.returncode:
            err = done.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"mailrelay {' '.join(args)}: {err}")

    def _start_redis(self, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        # appendfsync everysec: Redis's usual durability setting (acknowledged, fsync'd each second)
        cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        cmd += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(workdir)]
        proc = _spawn(cmd, workdir / "redis.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return proc, f"redis://127.0.0.1:{port}/0"
            time.sleep(0.05)
        _terminate(proc)
        raise RuntimeError("redis-server did not start")

    def start(self, workdir: Path, cert: Path, key: Path) -> RunningServer:
        helpers = []
        store_extra = ""
        if self.backend == "redis":
            redis, url = self._start_redis(workdir)
            helpers.append(redis)
            store_extra = f'redis_url = "{url}"\n'
        ports = {name: free_port() for name in ("plain", "starttls", "tls", "web")}
        config = workdir / "mailrelay.toml"
        config.write_text(
            MAILRELAY_CONFIG.format(
                data_dir=workdir / "data",
                cert=cert,
                key=key,
                backend=self.backend,
                store_extra=store_extra,
                **ports,
            )
        )
        try:
            self._cli(config, "account", "add", USER, "--password-stdin", stdin=PASSWORD.encode())
            self._cli(config, "sender", "add", USER, "bench.example")
            self._cli(config, "account", "set", USER, "--networks", "127.0.0.0/8")
            twistd = Path(sys.executable).with_name("twistd")
            cmd = [str(twistd if twistd.exists() else shutil.which("twistd") or "twistd")]
            cmd += ["-n", "--pidfile=", "mailrelay", "--config", str(config)]
            log_path = workdir / f"{self.name}.log"
            # The plugin lives in the source tree's twisted/plugins: put the tree on the path.
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
                ),
            }
            proc = _spawn(cmd, log_path, cwd=REPO, env=env)
            smtp_ports = [ports[sec] for sec in ("plain", "starttls", "tls")]
            wait_until_serving(proc, smtp_ports, log_path)
        except BaseException:
            for helper in helpers:
                _terminate(helper)
            raise
        listeners = {
            "plain": Listener("127.0.0.1", ports["plain"]),
            "starttls": Listener("127.0.0.1", ports["starttls"], USER, PASSWORD),
            "tls": Listener("127.0.0.1", ports["tls"], USER, PASSWORD),
        }
        return RunningServer(self.name, proc, listeners, log_path, helpers)


_ADAPTERS: list[ServerAdapter] = [TWISTED, AIOSMTPD, Mailrelay("sqlite"), Mailrelay("redis")]
ALL: dict[str, ServerAdapter] = {a.name: a for a in _ADAPTERS}
