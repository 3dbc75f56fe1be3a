"""The SMS channel made from ``[sms]``: the gateway, its receipts, and the service that keeps
an SMPP link up."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.application.service import Service

from mailrelay.config import Config, ConfigError
from mailrelay.delivery.sms.gateway import SmsChannel
from mailrelay.delivery.sms.http import HTTPGateway, HttpReceipts
from mailrelay.delivery.sms.receipts import ReceiptBook
from mailrelay.delivery.sms.smpp import SMPPGateway, parseSmppUrl
from mailrelay.interfaces import IStore


@dataclass(frozen=True)
class SmsParts:
    """What the rest of the tree needs of the SMS channel: the engine's ``channel``, the
    ``service`` to start and stop (SMPP), the ``receipts`` of ``POST /dlr/sms`` (HTTP)."""

    channel: SmsChannel
    service: Service | None = None
    receipts: HttpReceipts | None = None


def readReceiptKey(path: str) -> bytes:
    """The HMAC key of receipt posts: the file's bytes, surrounding white space removed."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"sms.receipt_secret_file: cannot read it: {e.strerror}") from None
    if len(key) < 16:
        raise ConfigError("sms.receipt_secret_file: the key must have at least 16 bytes")
    return key


def makeSms(config: Config, store: IStore, reactor: Any) -> SmsParts | None:
    """The SMS channel of ``[sms] gateway``; None without one. Raises ConfigError."""
    sms = config.sms
    if not sms.gateway:
        return None
    book = ReceiptBook(store, reactor)
    if sms.gatewayKind == "smpp":
        try:
            settings = parseSmppUrl(sms.gateway)
        except ValueError as e:
            raise ConfigError(f"sms.gateway: {e}") from None
        gateway = SMPPGateway(
            replace(settings, window=config.perProcess(sms.window)), reactor, book.receive
        )
        gateway.setName("sms-gateway")
        return SmsParts(SmsChannel(gateway, book), service=gateway)
    if sms.gatewayKind == "http":
        receipts = None
        if sms.receipt_secret_file is not None:
            receipts = HttpReceipts(book, readReceiptKey(sms.receipt_secret_file))
        channel = SmsChannel(
            HTTPGateway(sms.gateway, reactor), book, receiptsFollow=receipts is not None
        )
        return SmsParts(channel, receipts=receipts)
    raise ConfigError(f"sms.gateway: no gateway of kind {sms.gatewayKind!r} in this build")
