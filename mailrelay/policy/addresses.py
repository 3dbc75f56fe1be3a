"""
E-mail address syntax: RFC 5321 ``Mailbox`` (with RFC 6531's UTF-8), checked and normalised.

Normal form, the one every policy function compares and the store keeps:

- the local part keeps its case (RFC 5321 §2.4: only the destination may fold it); it is written
  as a dot-atom when it can be, else as a quoted string with only ``"`` and ``\\`` escaped, so
  ``"john.smith"@example.com`` and ``john.smith@example.com`` are one address;
- the domain is lower-case ASCII: an internationalised domain becomes its IDNA 2008 / UTS #46
  A-label form (``bücher.de`` -> ``xn--bcher-kva.de``), the form DNS and every header can carry;
- an address literal is written ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (compressed).

A domain must be fully qualified (RFC 5321 §2.3.5): at least two labels, and not ending in an
all-numeric label (``user@192.0.2.1`` needs brackets).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

from mailrelay.policy.decisions import Refusal, RefusalKind

MAX_LOCAL_PART = 64
MAX_ADDRESS = 254
MAX_DOMAIN = 253

# RFC 6531 UTF8-non-ascii, without C1 controls and without surrogates (which only come from
# undecodable bytes).
_NON_ASCII = r"\u00a0-\ud7ff\ue000-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~" + _NON_ASCII
_DOT_ATOM = re.compile(f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*")
_QTEXT = r"\x20\x21\x23-\x5b\x5d-\x7e" + _NON_ASCII
_QUOTED_CONTENT = re.compile(f"(?:[{_QTEXT}]|\\\\[\\x20-\\x7e])*")
_QUOTED = f'"{_QUOTED_CONTENT.pattern}"'
_MAILBOX = re.compile(f"(?P<local>[{_ATEXT}.]+|{_QUOTED})@(?P<domain>[^@]*)", re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class AddressSyntaxError(ValueError):
    """An address is not an RFC 5321 Mailbox; the message says what is wrong, for a customer."""


@dataclass(frozen=True)
class Mailbox:
    """A checked address in normal form (see the module docstring)."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def isAscii(self) -> bool:
        """False when the address needs SMTPUTF8 to travel (a UTF-8 local part)."""
        return self.local.isascii()


def _quoteLocal(content: str) -> str:
    """The canonical written form of a local part whose unquoted content is ``content``."""
    if _DOT_ATOM.fullmatch(content):
        return content
    escaped = content.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _checkLocal(local: str) -> str:
    if not local or local == '""':
        raise AddressSyntaxError("the local part (before @) is empty")
    if local.startswith('"'):
        content = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    elif _DOT_ATOM.fullmatch(local):
        content = local
    else:
        raise AddressSyntaxError(
            "the local part has a misplaced dot (at the start, the end, or two together); "
            "quote it if that is really the mailbox name"
        )
    written = _quoteLocal(content)
    if len(written.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressSyntaxError(f"the local part is longer than {MAX_LOCAL_PART} octets")
    return written


def _checkAsciiDomain(domain: str) -> str:
    labels = domain.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            if not label:
                raise AddressSyntaxError(f"the domain {domain!r} has an empty label")
            raise AddressSyntaxError(
                f"the domain label {label!r} is not valid "
                "(letters, digits and inner hyphens only, at most 63)"
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise AddressSyntaxError(f"the domain label {label!r} is not valid IDNA") from None
    if len(labels) < 2:
        raise AddressSyntaxError(f"the domain {domain!r} is not fully qualified")
    if labels[-1].isdigit():
        raise AddressSyntaxError(
            f"the domain {domain!r} looks like an IP address; write it as [{domain}]"
        )
    if len(domain) > MAX_DOMAIN:
        raise AddressSyntaxError(f"the domain is longer than {MAX_DOMAIN} characters")
    return domain


def literalAddress(literal: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IP address of an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``);
    raises ValueError for anything else."""
    inner = literal[1:-1] if literal.startswith("[") and literal.endswith("]") else ""
    if "%" in inner:  # an IPv6 scope id: any text at all to ipaddress, and no use here
        raise ValueError(inner)
    if inner[:5].lower() == "ipv6:":
        return ipaddress.IPv6Address(inner[5:])
    return ipaddress.IPv4Address(inner)


def _checkLiteral(literal: str) -> str:
    try:
        address = literalAddress(literal)
        if isinstance(address, ipaddress.IPv6Address):
            return f"[IPv6:{address.compressed}]"
        return f"[{address}]"
    except ValueError:
        raise AddressSyntaxError(
            f"{literal!r} is not an address literal ([192.0.2.1] or [IPv6:2001:db8::1])"
        ) from None


@functools.lru_cache(maxsize=4096)
def normaliseDomain(domain: str) -> str:
    """
    The normal form of a domain (lower-case, IDNA A-labels) or of an address literal.
    Raises AddressSyntaxError when it is neither.
    """
    if domain.startswith("["):
        return _checkLiteral(domain)
    if not domain:
        raise AddressSyntaxError("the domain (after @) is empty")
    if domain.endswith("."):
        raise AddressSyntaxError(f"the domain {domain!r} ends in a dot")
    if domain.isascii():
        return _checkAsciiDomain(domain.lower())
    try:
        ascii = idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise AddressSyntaxError(f"the domain {domain!r} is not a valid IDN") from None
    return _checkAsciiDomain(ascii)


def _checkLength(mailbox: Mailbox) -> Mailbox:
    if len(str(mailbox).encode("utf-8")) > MAX_ADDRESS:
        raise AddressSyntaxError(f"the address is longer than {MAX_ADDRESS} octets")
    return mailbox


@functools.lru_cache(maxsize=4096)
def parseMailbox(text: str) -> Mailbox:
    """
    ``text`` (an address as written in a MAIL/RCPT path, without brackets) in normal form.
    Raises AddressSyntaxError saying what is wrong. Remembered: an account's few senders and
    its regular recipients come again and again (a refusal is not remembered, it raises).
    """
    if len(text) > 4 * MAX_ADDRESS:
        raise AddressSyntaxError(f"the address is longer than {MAX_ADDRESS} octets")
    match = _MAILBOX.fullmatch(text)
    if match is None:
        if "@" not in text:
            raise AddressSyntaxError(f"{text!r} has no @domain")
        raise AddressSyntaxError(f"{text!r} is not a valid address")
    local = _checkLocal(match.group("local"))
    return _checkLength(Mailbox(local, normaliseDomain(match.group("domain"))))


def mailboxFromParts(content: str, domain: str) -> Mailbox:
    """
    The normal form of the address with local part ``content`` (already unquoted, as the
    ``email`` package's ``Address.username`` gives it) at ``domain``. Raises AddressSyntaxError.
    """
    if not content:
        raise AddressSyntaxError("the local part (before @) is empty")
    if not domain:
        raise AddressSyntaxError(f"{content!r} has no @domain")
    written = _quoteLocal(content)
    if not (_DOT_ATOM.fullmatch(written) or _QUOTED_CONTENT.fullmatch(written[1:-1])):
        raise AddressSyntaxError(f"the local part {content!r} has characters no address may have")
    return parseMailbox(f"{written}@{domain}")


def _needsUtf8(mailbox: Mailbox, smtputf8: bool) -> None:
    if not smtputf8 and not mailbox.isAscii:
        raise AddressSyntaxError("a non-ASCII local part needs the SMTPUTF8 parameter on MAIL FROM")


def recipientAddress(text: str, *, smtputf8: bool = False) -> Mailbox:
    """
    A RCPT TO e-mail address in normal form; ``smtputf8`` says whether the transaction's MAIL
    carried SMTPUTF8. Raises ``Refusal(BAD_RECIPIENT_SYNTAX)`` naming the problem.
    """
    try:
        mailbox = parseMailbox(text)
        _needsUtf8(mailbox, smtputf8)
    except AddressSyntaxError as e:
        raise Refusal(RefusalKind.BAD_RECIPIENT_SYNTAX, f"Recipient address invalid: {e}") from None
    return mailbox


def senderAddress(text: str, *, smtputf8: bool = False) -> Mailbox:
    """
    A MAIL FROM e-mail address in normal form. Raises ``Refusal(BAD_SENDER_SYNTAX)`` naming
    the problem.
    """
    try:
        mailbox = parseMailbox(text)
        _needsUtf8(mailbox, smtputf8)
    except AddressSyntaxError as e:
        raise Refusal(RefusalKind.BAD_SENDER_SYNTAX, f"Sender address invalid: {e}") from None
    return mailbox
