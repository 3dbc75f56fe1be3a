"""
The argument of ``MAIL FROM:`` and ``RCPT TO:``: a path and ESMTP parameters (RFC 5321 §4.1.2).

Only the shape is decided here; what the address means is for :mod:`mailrelay.policy.senders`
and :mod:`mailrelay.policy.recipients`. The parser is forgiving where real clients are sloppy
(a space after the colon, a bare address without angle brackets as SMS gateways document it, a
source route) and strict about everything else: a malformed argument raises
``Refused(SYNTAX_ERROR)`` (501 5.5.4), never anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from mailrelay.numbers import isDecimal
from mailrelay.smtp.replies import SYNTAX_ERROR, UNKNOWN_PARAMETER, Refused

Parameters = dict[str, str | None]

MAX_ARGUMENT = 2048
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_CONTROL = re.compile("[\t\r\n\x00]")  # never in an address, quoted or not
# esmtp-value: any printable except "=" and SP; RFC 6531 lets it be UTF-8.
_VALUE = re.compile(r"[!-<>-~\u00a0-\ud7ff\ue000-\U0010ffff]+")


def _refuse(reason: str) -> Refused:
    return Refused(SYNTAX_ERROR.withText(f"Syntax error in MAIL/RCPT argument: {reason}"))


def _closingBracket(text: str) -> int:
    """The index of the ``>`` that ends the path starting at ``text[0] == "<"``, or -1."""
    if '"' not in text:  # nearly every path: no quoted local part to look past
        return text.find(">")
    quoted = escaped = False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    return -1


def _parameters(text: str) -> Parameters:
    parameters: Parameters = {}
    for item in text.split():
        keyword, equals, value = item.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise _refuse(f"{keyword!r} is not a parameter keyword")
        if equals and not _VALUE.fullmatch(value):
            raise _refuse(f"the value of {keyword.upper()} is empty or has invalid characters")
        keyword = keyword.upper()
        if keyword in parameters:
            raise _refuse(f"{keyword} is given twice")
        parameters[keyword] = value if equals else None
    return parameters


def parsePathArgument(argument: str, *, allowNull: bool = False) -> tuple[str, Parameters]:
    """
    ``(address, parameters)`` from the text after ``MAIL FROM:`` or ``RCPT TO:``.

    The address is what stood between the angle brackets (source route dropped, as RFC 5321
    §4.1.1.3 asks), or the first word when the client left the brackets out; it is ``""`` for
    the null path ``<>``, which only MAIL accepts (``allowNull=True``). Parameter keywords are
    upper-cased; a parameter without ``=value`` maps to None. Raises ``Refused(SYNTAX_ERROR)``.
    """
    if len(argument) > MAX_ARGUMENT:
        raise _refuse("too long")
    text = argument.lstrip(" \t")
    if text.startswith("<"):
        end = _closingBracket(text)
        if end < 0:
            raise _refuse("the path has no closing >")
        address, rest = text[1:end], text[end + 1 :]
        if rest and rest[0] not in " \t":
            raise _refuse("parameters must be separated from the path by a space")
        if address.startswith("@"):
            _route, colon, address = address.partition(":")
            if not colon:
                raise _refuse("a source route must end in ':'")
    else:
        address, _, rest = text.partition(" ")
        if not address:
            raise _refuse("no address given")
        if "<" in address or ">" in address:
            raise _refuse("unbalanced angle brackets")
    if not address and not allowNull:
        raise _refuse("the null path <> is only allowed in MAIL FROM")
    if _CONTROL.search(address) or (" " in address and '"' not in address):
        raise _refuse("the address has white space or control characters")
    return address, _parameters(rest)


@dataclass(frozen=True)
class MailOptions:
    """What the MAIL parameters mailrelay knows say (RFC 1870, 6152, 6531)."""

    size: int | None = None
    body: Literal["7BIT", "8BITMIME"] | None = None
    smtputf8: bool = False


def mailOptions(parameters: Parameters) -> MailOptions:
    """
    The meaning of MAIL's SIZE, BODY and SMTPUTF8 parameters. A malformed value raises
    ``Refused(SYNTAX_ERROR)`` (501 5.5.4); any other parameter raises
    ``Refused(UNKNOWN_PARAMETER)`` (555 5.5.4).
    """
    size: int | None = None
    body: Literal["7BIT", "8BITMIME"] | None = None
    smtputf8 = False
    for keyword, value in parameters.items():
        if keyword == "SIZE":
            if value is None or not isDecimal(value, 20):
                raise _refuse("SIZE needs a number of octets")
            size = int(value)
        elif keyword == "BODY":
            upper = (value or "").upper()
            if upper == "7BIT":
                body = "7BIT"
            elif upper == "8BITMIME":
                body = "8BITMIME"
            else:
                raise _refuse("BODY must be 7BIT or 8BITMIME")
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise _refuse("SMTPUTF8 takes no value")
            smtputf8 = True
        elif keyword == "AUTH":
            # RFC 4954 §5: the submitter's identity, which a server may ignore; we know it.
            continue
        else:
            raise Refused(UNKNOWN_PARAMETER.withText(f"Unsupported MAIL parameter {keyword}"))
    return MailOptions(size, body, smtputf8)
