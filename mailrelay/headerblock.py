"""
Reading a message's header block: where it ends, its fields and their values.

The one header reader of the package: policy reads the fields it judges with it, and
:mod:`mailrelay.message` edits the block as the same fields, so both agree on where a field
starts and ends. Nothing here judges or changes a message; a line that is not a field is
reported as one with an empty name, for the caller to refuse or keep.

Every message's header is split into its fields on the way in and again on the way out: where
the optional C extension ``_mailrelay_scan`` was built, :func:`headerFields` is its
``header_fields`` (a fifth of the time); :func:`pyHeaderFields` is the reference, and the tests
hold the two to the same answers.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_BLANKS = (b" ", b"\t")


class HeaderField(NamedTuple):
    """One field of a header block: its lower-case name and where its lines are."""

    name: str
    start: int
    """Offset of the field's first line in the block."""
    end: int
    """Offset just after the CRLF that ends its last (continuation) line."""


_newField = tuple.__new__  # a field made without NamedTuple's __new__ (a Python call each)


def splitMessage(message: bytes) -> tuple[bytes, int]:
    """
    The header block of ``message`` (CRLF line ends) and where its body starts.

    The block runs up to and including the CRLF of its last field, without the empty line;
    it is empty when the message starts with the empty line. The body starts after the empty
    line, or at ``len(message)`` when there is none (a header-only message; a last line
    without its CRLF is then part of the block). The block starts the message, so a field's
    offsets in it are its offsets in the message too.
    """
    if message.startswith(b"\r\n"):
        return b"", 2
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, len(message)
    return message[: end + 2], end + 4


def pyHeaderFields(block: bytes) -> list[HeaderField]:
    """
    The fields of a header block from :func:`splitMessage`, in order. A continuation line
    (starting with a space or tab) belongs to the field before it; a line that is neither a
    field nor a continuation (a continuation line first among them) is its own field with an
    empty name, so it is kept but matches no name.
    """
    fields: list[HeaderField] = []
    if not block:
        return fields
    match = _FIELD_NAME.match
    lines = block.split(b"\r\n")
    if not lines[-1]:
        del lines[-1]  # the block ends with a CRLF
    name = None
    start = position = 0
    for line in lines:
        if line[:1] in _BLANKS and name is not None:
            position += len(line) + 2
            continue
        if name is not None:
            fields.append(_newField(HeaderField, (name, start, position)))
        found = match(line)
        name = found.group(1).decode("ascii").lower() if found is not None else ""
        start = position
        position += len(line) + 2
    fields.append(_newField(HeaderField, (name, start, min(position, len(block)))))
    return fields


try:
    from _mailrelay_scan import header_fields as _nativeHeaderFields
except ImportError:  # built without a C compiler: the same answers, more slowly
    headerFields = pyHeaderFields
else:

    def headerFields(block: bytes) -> list[HeaderField]:
        """The fields of a header block (see :func:`pyHeaderFields`)."""
        return _nativeHeaderFields(block, HeaderField)


def fieldValue(block: bytes, field: HeaderField) -> bytes:
    """The field's value unfolded (RFC 5322 §2.2.3: its CRLFs removed), leading blanks gone."""
    raw = block[field.start : field.end]
    colon = raw.find(b":")
    return raw[colon + 1 :].replace(b"\r\n", b"").lstrip(b" \t")
