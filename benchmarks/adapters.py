"""
How the runner starts, reaches and stops each server under test.

Every adapter turns a work directory and a certificate into a :class:`RunningServer`: a pid to
watch and one :class:`Listener` per security mode it offers (``plain``: no TLS and no AUTH,
``starttls`` and ``tls``: AUTH PLAIN over STARTTLS or implicit TLS).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks.scenarios import Scenario

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
    pid: int
    listeners: dict[str, Listener]  # by security: plain, starttls, tls
    log_path: Path
    stop: Callable[[], None]  # stop it and everything it needed; returns when all is gone
    tree: bool = False  # a process tree: its children's CPU and memory count too


class ServerAdapter(Protocol):
    @property
    def name(self) -> str:
        """The server's column label, e.g. ``mailrelay-sqlite``."""

    def unavailable(self) -> str | None:
        """Why this server cannot run here, or None when it can."""

    def skip(self, scenario: Scenario) -> str | None:
        """Why this server sits out ``scenario`` (e.g. it has no AUTH), or None."""

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
    exited: Callable[[], bool], ports: list[int], log_path: Path, timeout: float = 60.0
) -> None:
    """
    Poll until the first port answers with a 220 greeting and every other port accepts
    connections; raise if the server exits or is not there by ``timeout``.
    """
    deadline = time.monotonic() + timeout
    waiting = list(ports)
    while waiting and time.monotonic() < deadline:
        if exited():
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"server exited:\n{tail}")
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
        raise RuntimeError(f"port {waiting[0]} not serving within {timeout:.0f} s; see {log_path}")


def wait_for_log_lines(
    exited: Callable[[], bool], needles: list[str], log_path: Path, timeout: float = 60.0
) -> None:
    """Poll the server's log until it holds every one of ``needles``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if all(needle in text for needle in needles):
            return
        if exited():
            raise RuntimeError(f"server exited:\n{text[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"not in the log within {timeout:.0f} s: {needles}; see {log_path}")


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

    def skip(self, scenario: Scenario) -> str | None:
        return None

    def start(self, workdir: Path, cert: Path, key: Path) -> RunningServer:
        ports = {sec: free_port() for sec in ("plain", "starttls", "tls")}
        log_path = workdir / f"{self.name}.log"
        cmd = [
            sys.executable,
            "-m",
            f"benchmarks.servers.{Path(self.script).stem}",
            f"--port={ports['plain']}",
            f"--starttls-port={ports['starttls']}",
            f"--tls-port={ports['tls']}",
            f"--cert={cert}",
            f"--key={key}",
            f"--user={USER}",
            f"--password={PASSWORD}",
        ]
        proc = _spawn(cmd, log_path, cwd=REPO)
        try:
            wait_until_serving(lambda: proc.poll() is not None, list(ports.values()), log_path)
        except BaseException:
            _terminate(proc)
            raise
        listeners = {
            "plain": Listener("127.0.0.1", ports["plain"]),
            "starttls": Listener("127.0.0.1", ports["starttls"], USER, PASSWORD),
            "tls": Listener("127.0.0.1", ports["tls"], USER, PASSWORD),
        }
        return RunningServer(self.name, proc.pid, listeners, log_path, lambda: _terminate(proc))


TWISTED = BaselineScript("twisted-plain", "twisted_plain.py")
AIOSMTPD = BaselineScript("aiosmtpd", "aiosmtpd_plain.py")


MAILRELAY_CONFIG = """\
hostname = "bench.local"
data_dir = "{data_dir}"
workers = {workers}

[tls]
certificate = "{cert}"
key = "{key}"

[[listeners]]
endpoint = "tcp:{starttls}:interface=127.0.0.1"
security = "starttls"

[[listeners]]
endpoint = "tcp:{tls}:interface=127.0.0.1"
security = "tls"

[[listeners]]
endpoint = "tcp:{plain}:interface=127.0.0.1"
security = "none"
auth = "network"

[web]
endpoint = "tcp:{web}:interface=127.0.0.1"

[store]
backend = "{backend}"
{store_extra}
[limits]
# Not a speed setting: every session of a benchmark comes from 127.0.0.1, where a user's 5 000
# clients come from many addresses; idle5000 would meet the default 1 000 per address.
max_connections_per_client = 20000

[delivery]
mode = "hold"   # measure intake: accepted messages stay queued, no outbound traffic
"""


MAILRELAY_PORTS = ("plain", "starttls", "tls", "web")


def mailrelay_config(
    workdir: Path,
    cert: Path,
    key: Path,
    ports: dict[str, int],
    *,
    backend: str = "sqlite",
    workers: int | str = 1,
    store_extra: str = "",
) -> str:
    """:data:`MAILRELAY_CONFIG` for a relay whose data is in ``workdir/data``, listening on
    ``ports`` (one for each of :data:`MAILRELAY_PORTS`)."""
    return MAILRELAY_CONFIG.format(
        data_dir=workdir / "data",
        cert=cert,
        key=key,
        backend=backend,
        workers=workers,
        store_extra=store_extra,
        **ports,
    )


NOSTORE_PROBE = REPO / "benchmarks" / "probes" / "nostore"
"""Its ``sitecustomize`` makes the SQLite store's enqueue keep nothing: see the module."""


@dataclass
class Mailrelay:
    """
    mailrelay under ``twistd -n``: STARTTLS and implicit-TLS listeners with AUTH, and a
    relay-by-IP (``auth = "network"``) listener for the plain scenarios. One account
    (``bench``, sender domain ``bench.example``, networks 127.0.0.0/8) is set up with the
    admin CLI before the server starts.
    """

    backend: str = "sqlite"
    workers: int = 1
    nostore: bool = False  # the diagnostic column: enqueue keeps nothing (benchmarks/probes)

    @property
    def name(self) -> str:
        suffix = f"-{self.workers}w" if self.workers > 1 else ""
        if self.nostore:
            return f"mailrelay-nostore{suffix}"
        return f"mailrelay-{self.backend}{suffix}"

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

    def skip(self, scenario: Scenario) -> str | None:
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
        ports = {name: free_port() for name in MAILRELAY_PORTS}
        config = workdir / "mailrelay.toml"
        config.write_text(
            mailrelay_config(
                workdir,
                cert,
                key,
                ports,
                backend=self.backend,
                workers=self.workers,
                store_extra=store_extra,
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
            paths = [str(REPO), os.environ.get("PYTHONPATH")]
            if self.nostore:
                paths.insert(0, str(NOSTORE_PROBE))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
            proc = _spawn(cmd, log_path, cwd=REPO, env=env)
            smtp_ports = [ports[sec] for sec in ("plain", "starttls", "tls")]
            try:
                wait_until_serving(lambda: proc.poll() is not None, smtp_ports, log_path)
                # Sessions opened before a worker serves would all stay with the others.
                wait_for_log_lines(
                    lambda: proc.poll() is not None,
                    [f"worker {i} serving" for i in range(1, self.workers)],
                    log_path,
                )
            except BaseException:
                _terminate(proc)
                raise
        except BaseException:
            for helper in helpers:
                _terminate(helper)
            raise
        listeners = {
            "plain": Listener("127.0.0.1", ports["plain"]),
            "starttls": Listener("127.0.0.1", ports["starttls"], USER, PASSWORD),
            "tls": Listener("127.0.0.1", ports["tls"], USER, PASSWORD),
        }

        def stop() -> None:
            for each in [proc, *helpers]:  # the server first, then what it uses
                _terminate(each)

        return RunningServer(self.name, proc.pid, listeners, log_path, stop, tree=self.workers > 1)


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {workdir}/spool
data_directory = {workdir}/data
maillog_file_prefixes = {workdir}
maillog_file = {workdir}/maillog
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.local
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
relay_domains =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
# Queue every message durably (cleanup fsyncs the queue file before smtpd says 250), then
# discard it: no mail leaves the machine.
default_transport = discard:benchmark
relay_transport = discard:benchmark
local_transport = discard:benchmark
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
default_process_limit = 600
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
in_flow_delay = 0
"""

# Only what an accepting, discarding Postfix needs; nothing chrooted; SMTP on one loopback port.
POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


@dataclass
class Postfix:
    """
    A private Postfix instance (``postfix -c DIR``) on one loopback port: smtpd accepts from
    127.0.0.0/8 without AUTH, cleanup writes the queue file with fsync before the 250, and the
    queue manager hands it to ``discard``. Its own durable accept rate is the peer figure.
    Never touches the system instance or port 25. Needs root (Postfix's master runs as root).
    """

    name: str = "postfix"
    main: str = POSTFIX_MAIN  # main.cf, with {workdir}; benchmarks/e2e.py's relay has its own
    master: str = POSTFIX_MASTER  # master.cf, with {port}

    def unavailable(self) -> str | None:
        if not Path("/usr/sbin/postfix").exists():
            return "postfix is not installed (Debian package postfix)"
        if os.geteuid() != 0:
            return "a private Postfix instance needs root"
        return None

    def skip(self, scenario: Scenario) -> str | None:
        if scenario.idle:
            return f"n/a: a process per session ({scenario.idle} smtpd processes)"
        if scenario.security != "plain":
            return "n/a: no SASL set up for AUTH"
        return None

    def _postfix(self, conf: Path, command: str) -> None:
        subprocess.run(
            ["/usr/sbin/postfix", "-c", str(conf), command],
            capture_output=True,
            timeout=60,
            check=True,
        )

    def start(self, workdir: Path, cert: Path, key: Path) -> RunningServer:
        conf, data = workdir / "conf", workdir / "data"
        for directory in (conf, workdir / "spool", data):
            directory.mkdir()
        postfix_user = pwd.getpwnam("postfix")
        os.chown(data, postfix_user.pw_uid, postfix_user.pw_gid)
        port = free_port()
        (conf / "main.cf").write_text(self.main.format(workdir=workdir))
        (conf / "master.cf").write_text(self.master.format(port=port))
        log_path = workdir / "maillog"
        self._postfix(conf, "start")
        pid_file = workdir / "spool" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(pid_file.read_text().split()[0])

        def stop() -> None:
            with contextlib.suppress(subprocess.SubprocessError):
                self._postfix(conf, "stop")
            end = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists():
                with contextlib.suppress(subprocess.SubprocessError):
                    self._postfix(conf, "abort")

        try:
            wait_until_serving(lambda: not Path(f"/proc/{pid}").exists(), [port], log_path)
        except BaseException:
            stop()
            raise
        listeners = {"plain": Listener("127.0.0.1", port)}
        return RunningServer(self.name, pid, listeners, log_path, stop, tree=True)


_ADAPTERS: list[ServerAdapter] = [
    TWISTED,
    AIOSMTPD,
    Mailrelay("sqlite"),
    Mailrelay("redis"),
    Mailrelay("sqlite", workers=2),
    Mailrelay("redis", workers=2),
    Postfix(),
    Mailrelay("sqlite", nostore=True),  # diagnostics, not in the default run
    Mailrelay("sqlite", workers=2, nostore=True),
]
ALL: dict[str, ServerAdapter] = {a.name: a for a in _ADAPTERS}
