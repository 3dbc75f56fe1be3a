"""
Model values to and from what the Redis store keeps: hash fields, JSON strings.

Redis answers with bytes (the store's connections do no decoding of their own); these
functions take ``dict[str, str]`` made by :func:`fieldsOf` or raw ``bytes``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mailrelay.model import (
    Account,
    DkimKey,
    HeaderOptions,
    Notification,
    QueueItem,
    QueueState,
    Recipient,
    StatusEvent,
)
from mailrelay.store.common import (
    fromMillis,
    pendingPositions,
    recipientsAt,
    recipientsFromJSON,
    recipientsJSON,
    toMillis,
)

_COMPACT = (",", ":")


def text(value: bytes | str) -> str:
    """A reply value as text (replies are bytes, status replies already str)."""
    return value.decode() if isinstance(value, bytes) else value


def fieldsOf(flat: Sequence[Any]) -> dict[str, str]:
    """An ``HGETALL`` reply (``[field, value, field, value, ...]``) as a dict of text."""
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def flatten(fields: dict[str, str | None]) -> list[str]:
    """``HSET`` arguments from a dict, leaving out the None values (absent field = None)."""
    flat: list[str] = []
    for name, value in fields.items():
        if value is not None:
            flat += (name, value)
    return flat


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _optionalInt(value: int | None) -> str | None:
    return None if value is None else str(int(value))


def _intOrNone(fields: dict[str, str], name: str) -> int | None:
    value = fields.get(name)
    return None if value is None else int(value)


def accountFields(account: Account) -> dict[str, str | None]:
    """The hash fields of ``account:<name>`` (the name is in the key)."""
    rate = account.rate_per_second
    return {
        "password_hash": account.password_hash,
        "enabled": _flag(account.enabled),
        "sms_enabled": _flag(account.sms_enabled),
        "sms_segments": str(int(account.sms_segments)),
        "rate_per_second": None if rate is None else repr(float(rate)),
        "daily_quota": _optionalInt(account.daily_quota),
        "networks": json.dumps(list(account.networks), separators=_COMPACT),
        "require_alternative": _flag(account.require_alternative),
        "require_rcpt_headers": _flag(account.require_rcpt_headers),
        "attachments": account.attachments,
        "max_message_size": _optionalInt(account.max_message_size),
        "max_recipients": _optionalInt(account.max_recipients),
        "bounces": _flag(account.bounces),
        "sms_credits": _optionalInt(account.sms_credits),
    }


def accountFromFields(name: str, fields: dict[str, str]) -> Account:
    rate = fields.get("rate_per_second")
    return Account(
        name=name,
        password_hash=fields["password_hash"],
        enabled=fields["enabled"] == "1",
        sms_enabled=fields["sms_enabled"] == "1",
        sms_segments=int(fields["sms_segments"]),
        rate_per_second=None if rate is None else float(rate),
        daily_quota=_intOrNone(fields, "daily_quota"),
        networks=tuple(json.loads(fields["networks"])),
        require_alternative=fields["require_alternative"] == "1",
        require_rcpt_headers=fields["require_rcpt_headers"] == "1",
        attachments=fields["attachments"],  # type: ignore[arg-type]  # written by accountFields
        max_message_size=_intOrNone(fields, "max_message_size"),
        max_recipients=_intOrNone(fields, "max_recipients"),
        # Absent in accounts stored before the setting existed: its default.
        bounces=fields.get("bounces", "1") == "1",
        sms_credits=_intOrNone(fields, "sms_credits"),
    )


def notificationFields(notification: Notification) -> dict[str, str | None]:
    """The hash fields of ``notification:<id>``."""
    options = notification.options
    return {
        "account": notification.account,
        "sender": notification.sender,
        "recipients": recipientsJSON(notification.recipients),
        "size": str(int(notification.size)),
        "received": str(toMillis(notification.received_at)),
        "bulk_id": options.bulk_id,
        "notify_url": options.notify_url,
        "notify_content_type": options.notify_content_type,
        "callback_data": options.callback_data,
        "intermediate_report": _flag(options.intermediate_report),
        "tracking_url": options.tracking_url,
        "client_address": notification.client_address,
        "helo": notification.helo,
    }


def notificationFromFields(notificationId: str, fields: dict[str, str]) -> Notification:
    return Notification(
        notification_id=notificationId,
        account=fields["account"],
        sender=fields["sender"],
        recipients=recipientsFromJSON(fields["recipients"]),
        size=int(fields["size"]),
        received_at=fromMillis(int(fields["received"])),
        options=HeaderOptions(
            bulk_id=fields.get("bulk_id"),
            notify_url=fields.get("notify_url"),
            notify_content_type=fields["notify_content_type"],
            callback_data=fields.get("callback_data"),
            intermediate_report=fields["intermediate_report"] == "1",
            tracking_url=fields.get("tracking_url"),
        ),
        client_address=fields["client_address"],
        helo=fields["helo"],
    )


def eventJSON(event: StatusEvent) -> str:
    """One entry of ``events:<id>`` (the notification id is in the key)."""
    recipient = event.recipient
    return json.dumps(
        [
            recipient.address,
            recipient.channel,
            event.status_code,
            event.status_text,
            toMillis(event.timestamp),
        ],
        separators=_COMPACT,
    )


def eventFromJSON(notificationId: str, data: bytes | str) -> StatusEvent:
    address, channel, code, statusText, millis = json.loads(data)
    return StatusEvent(
        notification_id=notificationId,
        recipient=Recipient(address=address, channel=channel),
        status_code=code,
        status_text=statusText,
        timestamp=fromMillis(millis),
    )


def pendingOf(notification: Notification, fields: dict[str, str]) -> tuple[Recipient, ...]:
    """The recipients of ``notification`` still pending, by its hash's ``pending`` field."""
    recipients = notification.recipients
    return recipientsAt(recipients, pendingPositions(recipients, fields.get("pending")))


def queueItemFromFields(
    notificationId: str, state: QueueState, score: bytes | str, fields: dict[str, str]
) -> QueueItem:
    """The QueueItem of a notification in queue ``state`` with ``score`` there."""
    notification = notificationFromFields(notificationId, fields)
    return QueueItem(
        notification_id=notificationId,
        account=notification.account,
        sender=notification.sender,
        state=state,
        next_attempt=fromMillis(int(float(score))),
        attempts=int(fields.get("attempts", "0")),
        pending=pendingOf(notification, fields),
        received_at=notification.received_at,
        size=notification.size,
    )


def dkimKeyFields(key: DkimKey) -> list[str | bytes]:
    """``HSET`` arguments of ``dkim:<domain>`` (the domain is in the key)."""
    return [
        "selector",
        key.selector,
        "algorithm",
        key.algorithm,
        "private_key",
        bytes(key.private_key),
        "created",
        str(toMillis(key.created_at)),
    ]


def dkimKeyFromFields(domain: str, flat: Sequence[Any]) -> DkimKey:
    """The key from an ``HGETALL`` reply of ``dkim:<domain>`` (the private key stays bytes)."""
    raw = {text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    return DkimKey(
        domain=domain,
        selector=text(raw["selector"]),
        algorithm=text(raw["algorithm"]),  # type: ignore[arg-type]  # written by dkimKeyFields
        private_key=bytes(raw["private_key"]),
        created_at=fromMillis(int(raw["created"])),
    )
