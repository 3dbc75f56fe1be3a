"""
Delivery receipts: the gateway's word that a text reached the handset (``CH_SENT``) or never
will (``CH_FAILED``), written to the trail of the notification it belongs to (SPEC §8.1).

An SMPP receipt names only the SMSC's message id, so :class:`ReceiptBook` keeps, for each id
a gateway gave, the notification and recipient it belongs to in the store
(:class:`~mailrelay.interfaces.IGatewayIds`), for ``KEEP_GATEWAY_IDS``: a receipt that comes
after a restart, or over another relay's SMPP link to the same SMSC (relays sharing a Redis
store), finds its text there. The book remembers the texts this relay sent (the newest
``capacity`` of them) in front of the store, to spare a lookup, but the store decides: each
final receipt settles its part there in one atomic step, so a text gets one ``CH_SENT`` or
``CH_FAILED`` however many relays its receipts reach. A receipt for an id neither the store
nor the book knows (past its time, or never given) is logged as unknown and changes nothing;
the HTTP gateway's ids, chosen by mailrelay (``<notificationId>.<digits>``), are understood
without either.

A text sent in several parts is delivered when every part's receipt says so, and failed as
soon as one part's says it failed. A receipt may arrive before the engine has written the
outcome of the submit (``CH_RECEIVED``); this relay keeps it until then, so the trail keeps
its order. (A receipt that reaches another relay first is applied there at once: receipts
come seconds after the submit, well after that write, as a rule.) If the store could not take
a text's ids, this relay settles that text's receipts in memory, as best it can.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.delivery.reports import reportsFor
from mailrelay.interfaces import IStore
from mailrelay.model import Recipient, StatusEvent, fromTimestamp

log = Logger()

KEEP_GATEWAY_IDS = timedelta(days=3)
"""How long a gateway's message ids wait for their receipts in the store: past it, a receipt
for them is unknown."""

RECEIPT_STATES: dict[str, bool | None] = {
    "DELIVRD": True,
    "UNDELIV": False,
    "REJECTD": False,
    "EXPIRED": False,
    "DELETED": False,
    "UNKNOWN": False,
    "ENROUTE": None,
    "ACCEPTD": None,
}
"""SMPP 3.4 appendix B ``stat:`` values: final and delivered, final and failed, or not final."""

MESSAGE_STATES = {
    1: "ENROUTE",
    2: "DELIVRD",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIV",
    6: "ACCEPTD",
    7: "UNKNOWN",
    8: "REJECTD",
}
"""The ``message_state`` TLV's values as ``stat:`` words."""

_FIELD = re.compile(r"(id|stat|err):([^ ]*)", re.IGNORECASE)
_HTTP_ID = re.compile(r"([0-9]{1,20})\.([0-9]{10,16})")


@dataclass(frozen=True)
class Receipt:
    """One receipt: the gateway's message id, its state word, and its error code if any."""

    messageId: str
    state: str
    error: str = ""

    @property
    def delivered(self) -> bool | None:
        """True: delivered; False: failed for good; None: not final (or a state unknown)."""
        return RECEIPT_STATES.get(self.state.upper())


def parseSmppReceipt(
    text: str, messageId: str | None = None, messageState: int | None = None
) -> Receipt | None:
    """
    The receipt in a ``deliver_sm``'s text (``id:IIII sub:001 dlvrd:001 submit date:... done
    date:... stat:DELIVRD err:000 text:...``), its ``receipted_message_id`` and
    ``message_state`` TLVs taking precedence; None when neither names an id and a state.
    """
    fields: dict[str, str] = {}
    for match in _FIELD.finditer(text):
        fields.setdefault(match.group(1).lower(), match.group(2))
    ident = messageId or fields.get("id")
    state = MESSAGE_STATES.get(messageState or 0) or fields.get("stat")
    if not ident or not state:
        return None
    return Receipt(ident, state.upper(), fields.get("err", ""))


def httpMessageId(notificationId: str, recipient: Recipient) -> str:
    """The message id mailrelay gives a text sent through the HTTP gateway; its receipt
    names it back."""
    return f"{notificationId}.{recipient.address.lstrip('+')}"


@dataclass
class _Text:
    """One text to one recipient waiting for its receipts: ``parts``, the ids not settled
    as far as this relay knows; ``stored``, whether the store has them (and settles them)."""

    notificationId: str
    recipient: Recipient
    parts: set[str]
    released: bool = False
    early: list[Receipt] = field(default_factory=list)
    stored: bool = True


class ReceiptBook:
    """Which message ids wait for a receipt, and the trail events receipts become."""

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        capacity: int = 200_000,
        keepFor: timedelta = KEEP_GATEWAY_IDS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._capacity = capacity
        self._keepFor = keepFor
        self._byId: OrderedDict[str, _Text] = OrderedDict()
        self._unreleased: dict[str, list[_Text]] = {}
        self.recorded = 0
        self.unknown = 0

    def expect(
        self, messageIds: tuple[str, ...], notificationId: str, recipient: Recipient
    ) -> Deferred[None]:
        """Remember ``messageIds`` (the parts of one text) until their receipts come, here
        and in the store. Fires once the store has them (or has failed to: logged, and this
        relay settles them in memory); never fails."""
        if not messageIds:
            return succeed(None)
        entry = _Text(notificationId, recipient, set(messageIds))
        self._remember(entry)
        self._unreleased.setdefault(notificationId, []).append(entry)
        return Deferred.fromCoroutine(self._storeIds(entry, messageIds))

    async def _storeIds(self, entry: _Text, messageIds: tuple[str, ...]) -> None:
        until = fromTimestamp(self._clock.seconds()) + self._keepFor
        try:
            await self._store.rememberGatewayIds(
                entry.notificationId, entry.recipient, messageIds, until
            )
        except Exception as e:
            entry.stored = False
            log.warn(
                "sms gateway ids of {id} not stored, receipts only here: {error}",
                id=entry.notificationId,
                error=str(e),
            )

    def _remember(self, entry: _Text) -> None:
        for ident in entry.parts:
            self._byId[ident] = entry
        while len(self._byId) > self._capacity:
            self._byId.popitem(last=False)

    def release(self, notificationId: str) -> Deferred[None]:
        """The submit outcomes of ``notificationId`` are written: apply what came early.
        Fires when that is done; never fails."""
        applied = []
        for entry in self._unreleased.pop(notificationId, []):
            entry.released = True
            for receipt in entry.early:
                applied.append(self._applied(self._apply(entry, receipt), notificationId))
            entry.early.clear()
        return DeferredList(applied).addCallback(lambda _: None)

    def receive(self, receipt: Receipt) -> Deferred[None] | None:
        """Take one receipt; the Deferred of the work it causes (a lookup in the store, the
        settling of its part, the trail write), if any. The Deferred never fails."""
        if receipt.delivered is None:
            return None  # intermediate (or a state unknown): nothing to write
        entry = self._byId.get(receipt.messageId)
        if entry is not None and not entry.released:
            entry.early.append(receipt)
            return None
        return self._applied(self._receive(entry, receipt), receipt.messageId)

    async def _receive(self, entry: _Text | None, receipt: Receipt) -> None:
        if entry is None:
            entry = await self._lookup(receipt)
            if entry is None:
                return
        await self._apply(entry, receipt)

    async def _lookup(self, receipt: Receipt) -> _Text | None:
        """The text of a receipt this relay does not remember: in the store (sent before a
        restart, or by another relay), or named by an HTTP gateway id; None if unknown."""
        found = await self._store.lookupGatewayId(receipt.messageId)
        if found is not None:
            notificationId, recipient, parts = found
            entry = _Text(notificationId, recipient, set(parts), released=True)
            self._remember(entry)
            return entry
        match = _HTTP_ID.fullmatch(receipt.messageId)
        if match is not None:
            recipient = Recipient("+" + match.group(2), "sms")
            return _Text(match.group(1), recipient, {receipt.messageId}, True, stored=False)
        self.unknown += 1
        log.warn(
            "sms receipt for unknown message id {id} ({state}) ignored",
            id=receipt.messageId,
            state=receipt.state,
        )
        return None

    async def _apply(self, entry: _Text, receipt: Receipt) -> None:
        """Settle the receipt's part; once its text is settled, write the event."""
        delivered = receipt.delivered
        if delivered is None or receipt.messageId not in entry.parts:
            return  # intermediate, or a part this relay settled already
        if entry.stored:
            settled = await self._store.settleGatewayId(receipt.messageId, delivered)
        else:
            settled = not delivered or entry.parts == {receipt.messageId}
        if delivered:
            entry.parts.discard(receipt.messageId)
            self._byId.pop(receipt.messageId, None)
        else:
            for ident in entry.parts:
                self._byId.pop(ident, None)
            entry.parts.clear()
        if not settled:
            return  # more parts to come, or settled by another relay
        text = f"delivery receipt: {receipt.state}"
        if receipt.error and receipt.error.strip("0"):
            text += f" err:{receipt.error}"
        event = StatusEvent(
            entry.notificationId,
            entry.recipient,
            "CH_SENT" if delivered else "CH_FAILED",
            text,
            fromTimestamp(self._clock.seconds()),
        )
        self.recorded += 1
        await self._write(event)

    def _applied(self, work: Coroutine[Any, Any, None], about: str) -> Deferred[None]:
        """``work`` run, its failure logged."""

        def failed(failure: Failure) -> None:
            log.warn(
                "sms receipt for {id} not applied: {error}", id=about, error=str(failure.value)
            )

        return Deferred.fromCoroutine(work).addErrback(failed)

    async def _write(self, event: StatusEvent) -> None:
        """The receipt's event, with the delivery report it makes (SPEC §8.4: for SMS the
        receipt is the final state), in one write."""
        notification = await self._store.getNotification(event.notification_id)
        reports = (
            []
            if notification is None
            else reportsFor(notification, [event], receiptsFollow=frozenset({"sms"}))
        )
        await self._store.addEventsWithReports([event], reports)
