"""
The SMPP 3.4 PDUs the relay's transceiver exchanges, and nothing more: bind_transceiver,
submit_sm, deliver_sm, enquire_link, unbind, generic_nack and their responses.

Why our own codec: the maintained Python codecs either come with their own socket client
(smpplib, whose PDU objects also take their sequence numbers from a client object and ignore
one given to them) or target asyncio; these ten PDUs are a few fixed layouts. Every PDU is a
16-octet header (length, command id, status, sequence) and a body of C-octet strings
(NUL-terminated), single octets, and optional TLVs (tag, length, value).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

HEADER = struct.Struct(">IIII")
MAX_PDU = 64 * 1024
"""Longer PDUs are refused: the longest legitimate one here is a few hundred octets."""

BIND_TRANSCEIVER = 0x00000009
SUBMIT_SM = 0x00000004
DELIVER_SM = 0x00000005
UNBIND = 0x00000006
ENQUIRE_LINK = 0x00000015
GENERIC_NACK = 0x80000000
RESPONSE = 0x80000000

ESME_ROK = 0x00
ESME_RINVMSGLEN = 0x01
ESME_RINVCMDID = 0x03
ESME_RSYSERR = 0x08
ESME_RINVDSTADR = 0x0B
ESME_RBINDFAIL = 0x0D
ESME_RINVPASWD = 0x0E
ESME_RMSGQFUL = 0x14
ESME_RTHROTTLED = 0x58
ESME_RX_T_APPN = 0x64

TEMPORARY_ERRORS = frozenset({ESME_RSYSERR, ESME_RMSGQFUL, ESME_RTHROTTLED, ESME_RX_T_APPN})
"""submit_sm_resp statuses worth trying again later; every other error is final."""

TAG_RECEIPTED_MESSAGE_ID = 0x001E
TAG_MESSAGE_STATE = 0x0427

ESM_CLASS_RECEIPT = 0x04
"""deliver_sm ``esm_class`` message type bits (2-5) of an SMSC delivery receipt."""


class PDUError(ValueError):
    """Octets that are not a PDU this codec reads."""


@dataclass(frozen=True)
class PDU:
    """One PDU: header fields and the body octets after the header."""

    commandId: int
    sequence: int
    status: int = ESME_ROK
    body: bytes = b""

    def encode(self) -> bytes:
        return HEADER.pack(16 + len(self.body), self.commandId, self.status, self.sequence) + (
            self.body
        )

    @property
    def isResponse(self) -> bool:
        return bool(self.commandId & RESPONSE)


def decodeHeader(data: bytes) -> tuple[int, int, int, int]:
    """(length, command id, status, sequence) of the PDU starting ``data``."""
    length, commandId, status, sequence = HEADER.unpack_from(data)
    if not 16 <= length <= MAX_PDU:
        raise PDUError(f"PDU length {length} out of range")
    return length, commandId, status, sequence


def decode(data: bytes) -> PDU:
    """One whole PDU."""
    length, commandId, status, sequence = decodeHeader(data)
    if length != len(data):
        raise PDUError(f"PDU length {length} but {len(data)} octets")
    return PDU(commandId, sequence, status, bytes(data[16:]))


def cstring(text: str | bytes, maximum: int) -> bytes:
    """A C-octet string field (ASCII, NUL-terminated, at most ``maximum`` octets with it)."""
    raw = text.encode("ascii") if isinstance(text, str) else text
    if b"\x00" in raw or len(raw) + 1 > maximum:
        raise PDUError(f"{raw[:20]!r}... does not fit a {maximum}-octet field")
    return raw + b"\x00"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def cstring(self) -> str:
        end = self.data.find(b"\x00", self.at)
        if end < 0:
            raise PDUError("C-octet string without its NUL")
        value = self.data[self.at : end].decode("latin-1")
        self.at = end + 1
        return value

    def octet(self) -> int:
        if self.at >= len(self.data):
            raise PDUError("PDU body too short")
        value = self.data[self.at]
        self.at += 1
        return value

    def octets(self, count: int) -> bytes:
        if self.at + count > len(self.data):
            raise PDUError("PDU body too short")
        value = self.data[self.at : self.at + count]
        self.at += count
        return value

    def tlvs(self) -> dict[int, bytes]:
        found = {}
        while self.at < len(self.data):
            tag, length = struct.unpack(">HH", self.octets(4))
            found[tag] = self.octets(length)
        return found


def bindTransceiver(sequence: int, systemId: str, password: str, systemType: str = "") -> PDU:
    body = (
        cstring(systemId, 16)
        + cstring(password, 9)
        + cstring(systemType, 13)
        + bytes((0x34, 0, 0))  # interface_version 3.4, addr_ton, addr_npi
        + cstring("", 41)  # address_range
    )
    return PDU(BIND_TRANSCEIVER, sequence, body=body)


@dataclass(frozen=True)
class Bind:
    systemId: str
    password: str
    systemType: str
    interfaceVersion: int


def readBind(body: bytes) -> Bind:
    reader = _Reader(body)
    systemId, password, systemType = reader.cstring(), reader.cstring(), reader.cstring()
    return Bind(systemId, password, systemType, reader.octet())


def address(text: str) -> tuple[int, int, str]:
    """(ton, npi, digits) of a number (``+4477...``: international, E.164) or of an
    alphanumeric sender id (ton 5, npi 0)."""
    digits = text.lstrip("+")
    if digits.isascii() and digits.isdigit():
        return (1, 1, digits) if text.startswith("+") else (0, 1, digits)
    return (5, 0, text)


@dataclass(frozen=True)
class ShortMessage:
    """The fields of submit_sm and deliver_sm the relay sets or reads."""

    source: str
    destination: str
    shortMessage: bytes
    esmClass: int = 0
    dataCoding: int = 0
    registeredDelivery: int = 0
    sourceTon: int = 0
    sourceNpi: int = 0
    destTon: int = 1
    destNpi: int = 1
    tlvs: dict[int, bytes] = field(default_factory=dict)

    def body(self) -> bytes:
        if len(self.shortMessage) > 254:
            raise PDUError(f"short_message of {len(self.shortMessage)} octets (at most 254)")
        return (
            cstring("", 6)  # service_type
            + bytes((self.sourceTon, self.sourceNpi))
            + cstring(self.source, 21)
            + bytes((self.destTon, self.destNpi))
            + cstring(self.destination, 21)
            + bytes((self.esmClass, 0, 0))  # esm_class, protocol_id, priority_flag
            + cstring("", 17)  # schedule_delivery_time
            + cstring("", 17)  # validity_period
            + bytes((self.registeredDelivery, 0, self.dataCoding, 0, len(self.shortMessage)))
            + self.shortMessage
            + b"".join(
                struct.pack(">HH", tag, len(value)) + value for tag, value in self.tlvs.items()
            )
        )


def readShortMessage(body: bytes) -> ShortMessage:
    reader = _Reader(body)
    reader.cstring()  # service_type
    sourceTon, sourceNpi = reader.octet(), reader.octet()
    source = reader.cstring()
    destTon, destNpi = reader.octet(), reader.octet()
    destination = reader.cstring()
    esmClass = reader.octet()
    reader.octets(2)  # protocol_id, priority_flag
    reader.cstring()
    reader.cstring()
    registered = reader.octet()
    reader.octet()  # replace_if_present_flag
    dataCoding = reader.octet()
    reader.octet()  # sm_default_msg_id
    text = reader.octets(reader.octet())
    return ShortMessage(
        source,
        destination,
        text,
        esmClass,
        dataCoding,
        registered,
        sourceTon,
        sourceNpi,
        destTon,
        destNpi,
        reader.tlvs(),
    )


def messageIdBody(messageId: str) -> bytes:
    """The body of submit_sm_resp and bind_transceiver_resp (a message or system id)."""
    return cstring(messageId, 65)


def readMessageId(body: bytes) -> str:
    """The id in a submit_sm_resp body ('' for an error response without a body)."""
    return _Reader(body).cstring() if body else ""


def receiptFields(message: ShortMessage) -> tuple[str | None, int | None]:
    """A receipt's ``receipted_message_id`` and ``message_state`` TLVs, where present."""
    ident = message.tlvs.get(TAG_RECEIPTED_MESSAGE_ID)
    state = message.tlvs.get(TAG_MESSAGE_STATE)
    return (
        ident.rstrip(b"\x00").decode("latin-1") if ident else None,
        state[0] if state else None,
    )
