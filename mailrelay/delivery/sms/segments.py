"""
An SMS text cut into the user data of the short messages that carry it (GSM 03.38, 23.040).

The encoding and the count come from :func:`mailrelay.policy.sms.measureSms`, the same measure
the intake charged and limited the text by, so what leaves is what was accepted. GSM-7 text is
encoded with the ``gsm0338`` codec, one septet per octet (SMPP ``data_coding`` 0: the SMSC
packs septets for the air interface), an extension character as escape + character; UCS-2 is
UTF-16 big-endian (``data_coding`` 8). A text longer than one message goes as concatenated parts,
each behind an 8-bit-reference user data header (``05 00 03 ref total seq``), 153 septets or 67
UTF-16 code units a part; an escape pair or a surrogate pair is never cut in two.
"""

from __future__ import annotations

from dataclasses import dataclass

import gsm0338  # noqa: F401  # registers the "gsm03.38" codec

from mailrelay.policy.sms import LIMITS, Encoding, measureSms

GSM_CODEC = "gsm03.38"
DATA_CODING: dict[Encoding, int] = {"GSM-7": 0x00, "UCS-2": 0x08}
"""SMPP ``data_coding``: 0 the SMSC default alphabet (GSM 03.38), 8 UCS-2."""
ESM_CLASS_UDHI = 0x40
"""``esm_class`` bit: the short message starts with a user data header."""
MAX_PARTS = 255


class TooManyParts(ValueError):
    """A text that would need more than 255 concatenated parts (the UDH's count is one octet)."""


@dataclass(frozen=True)
class Segments:
    """The short messages of one text: ``parts`` are their ``short_message`` octets, each
    starting with the concatenation header when there is more than one."""

    encoding: Encoding
    parts: tuple[bytes, ...]

    @property
    def dataCoding(self) -> int:
        return DATA_CODING[self.encoding]

    @property
    def esmClass(self) -> int:
        return ESM_CLASS_UDHI if len(self.parts) > 1 else 0


def _units(text: str, encoding: Encoding) -> list[bytes]:
    """Each character of ``text`` as the octets it takes, an indivisible unit each."""
    if encoding == "GSM-7":
        return [char.encode(GSM_CODEC) for char in text]
    return [char.encode("utf-16-be") for char in text]


def splitText(text: str, reference: int) -> Segments:
    """
    ``text`` as short messages, the parts of a concatenated one numbered under ``reference``
    (0-255; the same for every part of this text, different from the other texts to the same
    handset in flight). Raises TooManyParts past 255 parts.
    """
    length = measureSms(text)
    units = _units(text, length.encoding)
    perPart = LIMITS[length.encoding][1]
    # One octet per septet (GSM-7), two per code unit (UCS-2).
    octetsPerUnit = 1 if length.encoding == "GSM-7" else 2
    if length.segments == 1:
        return Segments(length.encoding, (b"".join(units),))
    chunks: list[list[bytes]] = [[]]
    used = 0
    for unit in units:
        cost = len(unit) // octetsPerUnit
        if used + cost > perPart:
            chunks.append([])
            used = 0
        chunks[-1].append(unit)
        used += cost
    total = len(chunks)
    if total > MAX_PARTS:
        raise TooManyParts(f"the text needs {total} parts; at most {MAX_PARTS} can be joined")
    assert total == length.segments, (total, length.segments)
    ref = reference & 0xFF
    return Segments(
        length.encoding,
        tuple(
            bytes((0x05, 0x00, 0x03, ref, total, seq)) + b"".join(chunk)
            for seq, chunk in enumerate(chunks, start=1)
        ),
    )


@dataclass(frozen=True)
class Part:
    """One received short message, read back: its concatenation header (if any) and text."""

    reference: int | None
    total: int
    sequence: int
    text: str


def readPart(shortMessage: bytes, esmClass: int, dataCoding: int) -> Part:
    """A ``short_message`` as :func:`splitText` writes it, read back (for SMSC-side code and
    tests). Raises ValueError on a header or encoding it cannot read."""
    reference, total, sequence = None, 1, 1
    payload = shortMessage
    if esmClass & ESM_CLASS_UDHI:
        headerLength = shortMessage[0]
        header, payload = shortMessage[1 : 1 + headerLength], shortMessage[1 + headerLength :]
        if len(header) >= 5 and header[0] == 0x00 and header[1] == 3:
            reference, total, sequence = header[2], header[3], header[4]
        else:
            raise ValueError(f"unknown user data header {header.hex()}")
    if dataCoding == DATA_CODING["UCS-2"]:
        text = payload.decode("utf-16-be")
    elif dataCoding == DATA_CODING["GSM-7"]:
        text = payload.decode(GSM_CODEC)
    else:
        raise ValueError(f"data_coding {dataCoding} not read here")
    return Part(reference, total, sequence, text)
