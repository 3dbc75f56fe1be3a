"""
Splitting a MAIL FROM / RCPT TO argument into the path and its ESMTP parameters.

This is wire syntax only; whether the address inside is a valid mailbox or phone number is
the policy's decision. Clients are met halfway where the real world needs it: a space after
the colon is accepted, and so is a path without angle brackets (the SMS-over-SMTP gateways
document ``MAIL FROM: +393331234567``).
"""

from __future__ import annotations

import re

_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+$")


class PathError(ValueError):
    """The argument is not a path followed by parameters."""


def _closingBracket(text: str) -> int:
    """Index of the ``>`` that closes a path starting with ``<``, skipping quoted strings."""
    quoted = False
    i = 1
    while i < len(text):
        char = text[i]
        if quoted and char == "\\":
            i += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
        i += 1
    raise PathError("Missing closing '>' in path")


def splitPath(argument: str, allowEmpty: bool) -> tuple[str, dict[str, str | None]]:
    """
    ``(path, parameters)`` from the text after ``FROM:`` or ``TO:``. The path comes without
    brackets or source route; parameter names are upper-cased. Raises PathError.
    """
    text = argument.lstrip(" ")
    if text.startswith("<"):
        end = _closingBracket(text)
        path, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise PathError("Unexpected text after path")
        if path.startswith("@"):
            # An obsolete source route (RFC 5321 §4.1.2 "A-d-l"): ignored, as the RFC asks.
            _, colon, path = path.partition(":")
            if not colon:
                raise PathError("Malformed source route")
    else:
        path, _, rest = text.partition(" ")
        if path.startswith('"') or "<" in path or ">" in path:
            raise PathError("Malformed path")
    if not path and not allowEmpty:
        raise PathError("Empty path not allowed here")
    if any(c in path for c in "\r\n\0") or (not path.startswith('"') and " " in path):
        raise PathError("Malformed path")
    return path, _parameters(rest)


def _parameters(text: str) -> dict[str, str | None]:
    parameters: dict[str, str | None] = {}
    for item in text.split():
        name, equals, value = item.partition("=")
        if not _KEYWORD.match(name) or (equals and not _VALUE.match(value)):
            raise PathError(f"Malformed parameter {item!r}")
        name = name.upper()
        if name in parameters:
            raise PathError(f"Parameter {name} given twice")
        parameters[name] = value if equals else None
    return parameters
