"""What one delivery attempt made of one recipient: the value every channel (the ESMTP client,
the SMS gateways) hands back to :class:`~mailrelay.delivery.engine.DeliveryEngine`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mailrelay.model import Recipient

Kind = Literal["delivered", "deferred", "failed"]


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in this attempt."""

    recipient: Recipient
    kind: Kind
    reply: str  # for the trail: "host: 550 5.1.1 ..." or a local reason
    dsnCode: str
    host: str = ""
    final: bool = False  # delivered to the recipient's own MX (mx mode)
