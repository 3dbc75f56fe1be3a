"""
How long an SMS text is on the air: GSM 03.38 7-bit or UCS-2, and how many segments it needs.

A text made only of the GSM 03.38 default alphabet is sent 7-bit: a basic character costs one
septet, a character of the extension table (``€ [ ] { } ^ ~ \\ |`` and form feed) costs two
(escape + character). 160 septets fit in a single message; once the text is split each segment
carries 153 (the user data header takes the rest), and an escape pair is never split between two
segments. Any other character makes the whole text UCS-2: 70 UTF-16 code units in a single
message, 67 per segment when split, a surrogate pair never split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mailrelay.policy.decisions import Refusal, RefusalKind

Encoding = Literal["GSM-7", "UCS-2"]

GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
"""The GSM 03.38 default alphabet (one septet each); the escape code itself is not a character."""

GSM_EXTENSION = frozenset("\f^{}\\[~]|€")
"""The GSM 03.38 extension table: two septets each (escape + character)."""

LIMITS: dict[Encoding, tuple[int, int]] = {"GSM-7": (160, 153), "UCS-2": (70, 67)}
"""Per encoding: units in a single message, units per segment of a concatenated message."""


@dataclass(frozen=True)
class SmsLength:
    """The measure of one text: its encoding, its length in units, and its segment count."""

    encoding: Encoding
    units: int
    """Septets for GSM-7, UTF-16 code units for UCS-2."""
    segments: int

    @property
    def unitName(self) -> str:
        return "septets" if self.encoding == "GSM-7" else "UTF-16 code units"


def _segments(costs: list[int], single: int, perSegment: int) -> int:
    if sum(costs) <= single:
        return 1
    segments, used = 1, 0
    for cost in costs:
        if used + cost > perSegment:
            segments += 1
            used = 0
        used += cost
    return segments


def measureSms(text: str) -> SmsLength:
    """
    The encoding the text needs, its length in that encoding's units, and the number of
    segments it is sent in (an empty text is one segment).
    """
    costs: list[int] = []
    for char in text:
        if char in GSM_BASIC:
            costs.append(1)
        elif char in GSM_EXTENSION:
            costs.append(2)
        else:
            break
    else:
        single, perSegment = LIMITS["GSM-7"]
        return SmsLength("GSM-7", sum(costs), _segments(costs, single, perSegment))
    costs = [1 if ord(char) < 0x10000 else 2 for char in text]
    single, perSegment = LIMITS["UCS-2"]
    return SmsLength("UCS-2", sum(costs), _segments(costs, single, perSegment))


def checkSmsText(text: str, maxSegments: int) -> SmsLength:
    """
    The measure of ``text`` if it fits in ``maxSegments`` segments (the account's
    ``sms_segments``); otherwise raise ``Refusal(CONTENT_REFUSED)`` whose reason gives the counts.
    """
    length = measureSms(text)
    if length.segments > maxSegments:
        single, perSegment = LIMITS[length.encoding]
        allowed = "1 segment" if maxSegments == 1 else f"{maxSegments} segments"
        raise Refusal(
            RefusalKind.CONTENT_REFUSED,
            f"SMS text is {length.units} {length.unitName} in {length.encoding} and needs "
            f"{length.segments} segments; this account allows {allowed} "
            f"({single} fit in one message, {perSegment} per segment when split)",
        )
    return length
