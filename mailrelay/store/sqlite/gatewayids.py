"""
The SQLite store's SMS gateway message ids (:class:`~mailrelay.interfaces.IGatewayIds`; the
table in ``schema/011_gateway_ids.sql``): kept in the file that holds their notification; looked
up in each file in turn (an id is in one file at most), settled only in the file that has it.
The work functions run inside the transaction their caller's thread manages.

A row is a part not settled yet; a part settled is deleted, so a text is complete when no row
of its ``text_id`` is left. A row whose ``until`` has passed is as good as gone: every query
skips it, and :func:`forgetPast` deletes it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime
from functools import partial

from twisted.internet.defer import Deferred, succeed

from mailrelay.interfaces import NotFound
from mailrelay.model import Recipient
from mailrelay.store.common import toMillis
from mailrelay.store.sqlite.files import StoreFiles, firstFound


class GatewayIds:
    """The :class:`~mailrelay.interfaces.IGatewayIds` methods, part of
    :class:`~mailrelay.store.sqlite.store.SQLiteStore`: the gateway ids in every file of its
    ``_files``."""

    _files: StoreFiles

    def rememberGatewayIds(
        self, notificationId: str, recipient: Recipient, ids: Iterable[str], until: datetime
    ) -> Deferred[None]:
        ids = tuple(ids)
        if not ids:
            return succeed(None)
        work = partial(_remember, recipient=recipient, ids=ids, until=toMillis(until))
        missing = NotFound(f"gateway ids of an unknown notification {notificationId}")
        return Deferred.fromCoroutine(self._files.onItsFile(notificationId, work, missing))

    def lookupGatewayId(
        self, gatewayId: str
    ) -> Deferred[tuple[str, Recipient, tuple[str, ...]] | None]:
        work = partial(_lookup, gatewayId=gatewayId, now=self._files.now())
        return self._files.reader.submitEach(work).addCallback(firstFound)

    def settleGatewayId(self, gatewayId: str, delivered: bool = True) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._settleInItsFile(gatewayId, delivered))

    async def _settleInItsFile(self, gatewayId: str, delivered: bool) -> bool:
        now = self._files.now()
        work = partial(_settle, gatewayId=gatewayId, delivered=delivered, now=now)
        settled = False
        for file in await self._files.filesWhere(partial(_has, gatewayId=gatewayId, now=now)):
            settled = await self._files.writer.submit(work, file) or settled
        return settled


def _remember(
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


def _lookup(
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


def _has(connection: sqlite3.Connection, gatewayId: str, now: int) -> bool:
    row = connection.execute(
        "SELECT 1 FROM gateway_ids WHERE gateway_id = ? AND until > ?", (gatewayId, now)
    ).fetchone()
    return row is not None


def _settle(connection: sqlite3.Connection, gatewayId: str, delivered: bool, now: int) -> bool:
    """The write of :meth:`GatewayIds.settleGatewayId` in this file: whether it settled the text."""
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
