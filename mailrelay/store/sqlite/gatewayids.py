"""
The SMS gateways' message ids on a database thread (:class:`~mailrelay.interfaces.IGatewayIds`
of the SQLite store; the table in ``schema/011_gateway_ids.sql``). Each function runs inside
the transaction its caller's thread manages, on the file that holds the notification (writes)
or on each file in turn (reads, settles: an id is in one file at most).

A row is a part not settled yet; a part settled is deleted, so a text is complete when no row
of its ``text_id`` is left. A row whose ``until`` has passed is as good as gone: every query
skips it, and :func:`forgetPast` deletes it.
"""

from __future__ import annotations

import sqlite3

from mailrelay.model import Recipient


def rememberGatewayIds(
    connection: sqlite3.Connection,
    number: int,
    recipient: Recipient,
    ids: tuple[str, ...],
    until: int,
) -> None:
    """Keep ``ids``, the parts of one text of notification ``number``, until ``until`` (ms);
    the first id names the text."""
    connection.executemany(
        "INSERT OR REPLACE INTO gateway_ids (gateway_id, text_id, notification_id, address, "
        "channel, until) VALUES (?, ?, ?, ?, ?, ?)",
        [(ident, ids[0], number, recipient.address, recipient.channel, until) for ident in ids],
    )


def lookupGatewayId(
    connection: sqlite3.Connection, gatewayId: str, now: int
) -> tuple[str, Recipient, tuple[str, ...]] | None:
    """The notification id, recipient and unsettled part ids of ``gatewayId``'s text, if this
    file has it and its time has not passed (``now`` in ms)."""
    row = connection.execute(
        "SELECT text_id, notification_id, address, channel FROM gateway_ids "
        "WHERE gateway_id = ? AND until > ?",
        (gatewayId, now),
    ).fetchone()
    if row is None:
        return None
    textId, number, address, channel = row
    parts = connection.execute(
        "SELECT gateway_id FROM gateway_ids WHERE text_id = ? AND until > ? ORDER BY gateway_id",
        (textId, now),
    ).fetchall()
    return str(number), Recipient(address, channel), tuple(part for (part,) in parts)


def settleGatewayId(
    connection: sqlite3.Connection, gatewayId: str, delivered: bool, now: int
) -> bool:
    """The write of ``settleGatewayId`` in this file: whether it settled the text."""
    row = connection.execute(
        "SELECT text_id FROM gateway_ids WHERE gateway_id = ? AND until > ?", (gatewayId, now)
    ).fetchone()
    if row is None:
        return False
    (textId,) = row
    if not delivered:
        connection.execute("DELETE FROM gateway_ids WHERE text_id = ?", (textId,))
        return True
    connection.execute("DELETE FROM gateway_ids WHERE gateway_id = ?", (gatewayId,))
    left = connection.execute(
        "SELECT 1 FROM gateway_ids WHERE text_id = ? AND until > ? LIMIT 1", (textId, now)
    ).fetchone()
    return left is None


def forgetPast(connection: sqlite3.Connection, now: int) -> None:
    """Delete the ids whose time has passed (through gateway_ids_until)."""
    connection.execute("DELETE FROM gateway_ids WHERE until <= ?", (now,))
