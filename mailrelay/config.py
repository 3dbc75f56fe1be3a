"""
The TOML configuration file (SPEC §3) turned into validated, immutable values.

Every key is declared once, in the dataclasses below; a key that is not declared, or a value of
the wrong type, is refused with a :class:`ConfigError` naming the key (``listeners[1].security``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

DEFAULT_CONFIG_FILE = "mailrelay.toml"


class ConfigError(ValueError):
    """The configuration is not usable; the message names the offending key."""


@dataclass(frozen=True)
class ListenerConfig:
    endpoint: str
    security: Literal["starttls", "tls", "none"] = "starttls"
    auth: Literal["required", "network"] = "required"
    allow_plaintext_auth: bool = False


@dataclass(frozen=True)
class TLSConfig:
    certificate: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class WebConfig:
    endpoint: str = "tcp:8025:interface=127.0.0.1"
    # Which process answers the endpoint (webInOwnProcess): "auto", a process of its own
    # when the relay runs several; "separate", always; "main", the main process.
    process: Literal["auto", "separate", "main"] = "auto"


@dataclass(frozen=True)
class StoreConfig:
    backend: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    instance_id: int = 0


MAX_IN_FLOW_DELAY = 10
"""Seconds: a longer wait before MAIL would meet clients' own command timeouts."""


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 20 * 1024 * 1024
    max_recipients: int = 1000
    command_timeout: int = 300
    data_timeout: int = 600
    status_retention_days: int = 7
    max_auth_failures: int = 3
    max_line_length: int = 1000  # octets including CRLF, RFC 5321 §4.5.3.1.6
    max_connections: int = 20000  # SMTP connections open at once, all listeners together
    max_connections_per_client: int = 1000  # from one client address
    # A TLS handshake (implicit TLS, or after STARTTLS) must complete within this many seconds,
    # else the connection is aborted: a stalled handshake would otherwise hold a slot for ever.
    tls_handshake_timeout: int = 30
    # The whole DATA section (354 to the end marker) within data_total_timeout seconds, and
    # from data_rate_grace seconds on at least data_min_rate octets for every second past it
    # (the grace is data_timeout's: as long as a client may be silent anyway). A client that
    # dribbles a byte now and then cannot hold a slot for ever (see SECURITY.md).
    data_total_timeout: int = 1800
    data_min_rate: int = 1024
    data_rate_grace: int = 600
    # SIGTERM: sessions inside DATA (or waiting for their message to be stored) get this many
    # seconds to finish before they are closed; new commands are answered 421 4.3.2 at once.
    drain_timeout: int = 30
    # When messages arrive faster than the relay delivers them, a new message waits up to this
    # many seconds before its MAIL is answered (Postfix's in_flow_delay): the queue stops
    # growing and the delivery keeps its share of the CPU. 0: never wait.
    in_flow_delay: int = 1


TLSPolicyName = Literal["verify", "opportunistic", "none"]


@dataclass(frozen=True)
class DeliveryConfig:
    mode: Literal["smarthost", "mx", "hold"] = "hold"
    smarthost: str = "tcp:host=127.0.0.1:port=25"
    smarthost_tls: Literal["required", "opportunistic", "implicit", "none"] = "opportunistic"
    smarthost_username: str | None = None
    smarthost_password_file: str | None = None
    smarthost_ca_file: str | None = None  # CA to verify the smarthost with; default: the system's
    ca_file: str | None = None  # CA for verified TLS to MX hosts; default: the system's
    nameservers: tuple[str, ...] = ()
    mx_port: int = 25
    allow_networks: tuple[str, ...] = ()
    max_connections: int = 100
    max_connections_per_destination: int = 20
    max_recipients_per_transaction: int = 50
    connect_timeout: str = "30s"
    command_timeout: str = "5m"  # greeting and every command
    data_timeout: str = "10m"
    retry_min: str = "5m"
    retry_max: str = "1h"
    max_queue_lifetime: str = "5d"
    lease: str = "5m"
    tls_policy: dict[str, TLSPolicyName] = field(default_factory=dict)

    def seconds(self, name: str) -> int:
        """One of the duration keys, in seconds (validated at load)."""
        return parseDuration(getattr(self, name))


DELIVERY_DURATIONS = (
    "connect_timeout",
    "command_timeout",
    "data_timeout",
    "retry_min",
    "retry_max",
    "max_queue_lifetime",
    "lease",
)


@dataclass(frozen=True)
class SMSConfig:
    domains: tuple[str, ...] = ()
    gateway: str = ""  # "smpp://USER:PASSWORD@host:port" or "https://..."; "": SMS held
    receipt_secret_file: str | None = None  # HMAC key of POST /dlr/sms (HTTP gateway)
    window: int = 10  # SMPP: submit_sm outstanding at once

    def __repr__(self) -> str:
        # The gateway URL may carry the SMPP password.
        return f"SMSConfig(domains={self.domains!r}, gateway=<{self.gatewayKind or 'none'}>)"

    @property
    def gatewayKind(self) -> str:
        """The gateway protocol: smpp, http, or empty for none."""
        scheme = self.gateway.partition(":")[0].lower()
        return {"smpp": "smpp", "https": "http", "http": "http"}.get(scheme, scheme)


@dataclass(frozen=True)
class DeliveryReportsConfig:
    allow_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrackingConfig:
    """SPEC §8.5: empty ``base_url``, no tracking (the headers are accepted and ignored)."""

    base_url: str = ""  # e.g. "https://t.relay.example.com": where /t/o/ and /t/c/ are reached
    endpoint: str = "tcp:8080"  # the public listener serving them (not the status API's)


DEFAULT_LISTENERS = (
    ListenerConfig("tcp:25", "starttls"),
    ListenerConfig("tcp:587", "starttls"),
    ListenerConfig("tcp:465", "tls"),
)


@dataclass(frozen=True)
class Config:
    hostname: str = field(default_factory=socket.getfqdn)
    data_dir: str = "./mailrelay-data"
    # Relay processes sharing the listening sockets, each accepting and delivering; 0 ("auto"
    # in the file): one per CPU core, decided at start (withProcessCount).
    workers: int = 0
    tls: TLSConfig = TLSConfig()
    listeners: tuple[ListenerConfig, ...] = DEFAULT_LISTENERS
    web: WebConfig = WebConfig()
    store: StoreConfig = StoreConfig()
    limits: LimitsConfig = LimitsConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    sms: SMSConfig = SMSConfig()
    delivery_reports: DeliveryReportsConfig = DeliveryReportsConfig()
    tracking: TrackingConfig = TrackingConfig()

    @property
    def dataPath(self) -> Path:
        return Path(self.data_dir)

    @property
    def processCount(self) -> int:
        """The relay's processes: ``workers``, or 1 while ``auto`` is not decided yet (a
        configuration read by the admin command line, or built in code)."""
        return max(1, self.workers)

    def perProcess(self, limit: int) -> int:
        """One relay process's part of a limit the whole relay keeps (``workers`` processes
        each keep their part in memory): rounded down, so that together they never allow
        more, but at least 1 (a limit below ``workers`` is then exceeded)."""
        return max(1, limit // self.processCount)


_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parseDuration(text: str) -> int:
    """Seconds in a duration written ``30s``, ``15m``, ``2h`` or ``5d``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a duration (like 30s, 15m, 2h, 5d): {text!r}")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is dict:
        keyHint, valueHint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return {
            _convert(k, keyHint, f"{where}"): _convert(v, valueHint, f"{where}.{k}")
            for k, v in value.items()
        }
    if origin is tuple:
        (item,) = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{where}: must be one of {allowed}, not {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(value, inner, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, not {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, not {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint!r}")  # pragma: no cover


def _build(cls: type, table: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"{where}: unknown key")
        kwargs[key] = _convert(value, hints[key], where)
    return cls(**kwargs)


def _positive(where: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: must be greater than 0, not {value}")


def _validate(config: Config) -> Config:
    if not config.listeners:
        raise ConfigError("listeners: at least one listener is needed")
    for i, listener in enumerate(config.listeners):
        if listener.security == "tls" and listener.allow_plaintext_auth:
            raise ConfigError(f"listeners[{i}].allow_plaintext_auth: meaningless with tls")
    if (config.tls.certificate is None) != (config.tls.key is None):
        raise ConfigError("tls: certificate and key go together")
    for name in (
        "max_message_size",
        "max_recipients",
        "command_timeout",
        "data_timeout",
        "status_retention_days",
        "max_auth_failures",
        "max_connections",
        "max_connections_per_client",
        "tls_handshake_timeout",
        "data_total_timeout",
        "drain_timeout",
    ):
        _positive(f"limits.{name}", getattr(config.limits, name))
    if config.limits.data_min_rate < 0 or config.limits.data_rate_grace < 0:
        raise ConfigError("limits.data_min_rate, data_rate_grace: must not be negative")
    if not 0 <= config.limits.in_flow_delay <= MAX_IN_FLOW_DELAY:
        raise ConfigError(f"limits.in_flow_delay: must be 0..{MAX_IN_FLOW_DELAY} seconds")
    if config.limits.max_line_length < 100:
        raise ConfigError("limits.max_line_length: must be at least 100")
    if not 0 <= config.store.instance_id <= 1023:
        raise ConfigError("store.instance_id: must be 0..1023")
    _validateWorkers(config)
    if config.web.process == "separate" and not shareableEndpoint(config.web.endpoint):
        raise ConfigError(
            'web.endpoint: with web.process = "separate" the endpoint must be a TCP one '
            f"(tcp:, tcp6:, systemd:domain=INET..., each also inside haproxy:), "
            f"not {config.web.endpoint!r}"
        )
    _validateDelivery(config.delivery)
    _validateSms(config)
    _validateNetworks("delivery_reports.allow_networks", config.delivery_reports.allow_networks)
    base = config.tracking.base_url
    if base and not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", base):
        raise ConfigError(f"tracking.base_url: not an http(s) URL without query: {base!r}")
    return config


def _validateSms(config: Config) -> None:
    """The ``[sms]`` gateway must be one this build serves (the delivery loop runs for it
    in every mode: ``[delivery] mode`` governs e-mail only)."""
    sms = config.sms
    _positive("sms.window", sms.window)
    if not sms.gateway:
        return
    if sms.gatewayKind not in ("smpp", "http"):
        raise ConfigError(
            "sms.gateway: this build serves smpp://USER:PASSWORD@host:port and https:// "
            f"gateways, not {sms.gatewayKind}:"
        )
    try:
        parts = urlsplit(sms.gateway)
        parts.port  # noqa: B018  # raises for a port that is not a number
    except ValueError as e:
        raise ConfigError(f"sms.gateway: not a URL: {e}") from None
    if not parts.hostname:
        raise ConfigError("sms.gateway: the URL names no host")
    if sms.gatewayKind == "smpp" and (not parts.username or parts.path not in ("", "/")):
        raise ConfigError("sms.gateway: an SMPP gateway is smpp://USER:PASSWORD@host:port")


def _validateNetworks(where: str, networks: tuple[str, ...]) -> None:
    for i, network in enumerate(networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"{where}[{i}]: not a network: {network!r}") from None


def _validateDelivery(delivery: DeliveryConfig) -> None:
    for name in DELIVERY_DURATIONS:
        try:
            seconds = parseDuration(getattr(delivery, name))
        except ValueError as e:
            raise ConfigError(f"delivery.{name}: {e}") from None
        if seconds <= 0:
            raise ConfigError(f"delivery.{name}: must be longer than 0")
    if delivery.seconds("retry_min") > delivery.seconds("retry_max"):
        raise ConfigError("delivery.retry_min: must not be longer than delivery.retry_max")
    for name in (
        "max_connections",
        "max_connections_per_destination",
        "max_recipients_per_transaction",
        "mx_port",
    ):
        _positive(f"delivery.{name}", getattr(delivery, name))
    _validateNetworks("delivery.allow_networks", delivery.allow_networks)
    for i, server in enumerate(delivery.nameservers):
        host, _, port = server.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            valid = port.isdigit() and 0 < int(port) < 65536
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(
                f"delivery.nameservers[{i}]: not an address:port (like 127.0.0.1:53): {server!r}"
            )
    if (delivery.smarthost_username is None) != (delivery.smarthost_password_file is None):
        raise ConfigError("delivery.smarthost_username: goes with smarthost_password_file")
    if delivery.mode == "smarthost":
        kind = delivery.smarthost.partition(":")[0].lower()
        if kind not in ("tcp", "tcp6") or "host=" not in delivery.smarthost:
            raise ConfigError(
                "delivery.smarthost: must be a tcp: endpoint with host= and port= "
                f"(like tcp:host=mta.internal:port=25), not {delivery.smarthost!r}"
            )


MAX_WORKERS = 64
# Endpoints whose listening socket another process can take over as it is: TCP ones, also
# inside haproxy: (a worker wraps its factory in the PROXY-protocol one itself). The TLS of
# ssl: lives in the factory, which a worker would not have; and a process that stops
# listening on a UNIX socket it took over deletes its file.
WORKER_ENDPOINT_KINDS = frozenset({"tcp", "tcp6", "systemd"})
PROXY_WRAPPER = "haproxy"


def proxied(endpoint: str) -> tuple[bool, str]:
    """Whether ``endpoint`` is a ``haproxy:`` one (the PROXY protocol in front), and the
    endpoint it wraps (``endpoint`` itself if it wraps none)."""
    kind, _, rest = endpoint.partition(":")
    if kind.strip().lower() == PROXY_WRAPPER:
        return True, rest
    return False, endpoint


AUTO_MAX_WORKERS = 8
"""``workers = "auto"`` runs one process per core, but no more than this many."""


def _shareable(listener: ListenerConfig) -> bool:
    """Whether another process can take the listener's socket over as it is."""
    return shareableEndpoint(listener.endpoint)


def shareableEndpoint(endpoint: str) -> bool:
    """Whether another process can take a socket listening on ``endpoint`` over as it is: a
    TCP socket of its own (not TLS, which the listening process would speak)."""
    inner = proxied(endpoint)[1]
    kind = inner.partition(":")[0].lower()
    unixSocket = kind == "systemd" and "domain=unix" in inner.lower()
    return kind in WORKER_ENDPOINT_KINDS and not unixSocket


def webInOwnProcess(config: Config) -> bool:
    """
    Whether the web endpoint is answered by a process of its own (:mod:`mailrelay.workers.web`)
    rather than by the main process, which delivers: ``[web] process``, where ``"auto"`` means
    yes when the relay runs several processes (``config`` has ``workers`` decided) and the
    endpoint's socket can be handed over.
    """
    if config.web.process == "auto":
        return config.workers > 1 and shareableEndpoint(config.web.endpoint)
    return config.web.process == "separate"


def withProcessCount(config: Config, cores: int | None = None) -> Config:
    """
    ``config`` with ``workers = "auto"`` decided, for a relay starting now: one process per
    core (``cores``, default ``os.cpu_count()``), at most ``AUTO_MAX_WORKERS``; one when a
    listener's socket cannot be shared between processes (not TCP), or with an SMPP gateway
    (every process would bind to it, and many SMSCs allow one bind per account), or when the
    store's instance numbers would run out. A number set in the file is kept as it is.
    """
    if config.workers:
        return config
    count = min(cores or os.cpu_count() or 1, AUTO_MAX_WORKERS, 1024 - config.store.instance_id)
    if not all(_shareable(listener) for listener in config.listeners):
        count = 1
    if config.sms.gatewayKind == "smpp":
        count = 1
    return dataclasses.replace(config, workers=max(1, count))


def _validateWorkers(config: Config) -> None:
    if not 0 <= config.workers <= MAX_WORKERS:
        raise ConfigError(
            f'workers: must be "auto" (or 0) or 1..{MAX_WORKERS}, not {config.workers}'
        )
    if config.workers <= 1:
        return
    for i, listener in enumerate(config.listeners):
        if not _shareable(listener):
            raise ConfigError(
                f"listeners[{i}].endpoint: with workers > 1 a listener must be a TCP one "
                f"(tcp:, tcp6:, systemd:domain=INET..., each also inside haproxy:), "
                f"not {listener.endpoint!r}"
            )
    # Each process makes ids with its own instance number: instance_id + its index.
    if (config.store.backend == "sqlite" or config.store.instance_id) and (
        config.store.instance_id + config.workers - 1 > 1023
    ):
        raise ConfigError(
            f"store.instance_id: {config.workers} workers need instance numbers "
            f"{config.store.instance_id}..{config.store.instance_id + config.workers - 1}, "
            "beyond 1023"
        )


def parseConfig(table: dict[str, Any]) -> Config:
    """A validated Config from a parsed TOML document."""
    if table.get("workers") == "auto":
        table = {**table, "workers": 0}
    return _validate(_build(Config, table))


def loadConfig(path: str | None) -> Config:
    """
    The configuration from ``path``; with no path, ``./mailrelay.toml`` if it exists, else the
    defaults. Raises ConfigError for unreadable or invalid files.
    """
    return loadConfigSource(path)[0]


def loadConfigSource(path: str | None) -> tuple[Config, str | None]:
    """:func:`loadConfig`, and the TOML text it was made from (None: the defaults), which
    :func:`configFromSource` turns into the same configuration again."""
    if path is None:
        if not Path(DEFAULT_CONFIG_FILE).exists():
            return _validate(Config()), None
        path = DEFAULT_CONFIG_FILE
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return configFromSource(text), text
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def configFromSource(text: str | None) -> Config:
    """The configuration of a TOML text (None: the defaults)."""
    if text is None:
        return _validate(Config())
    return parseConfig(tomllib.loads(text))
