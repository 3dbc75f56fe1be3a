"""
Phone numbers as recipients (SPEC §5), normalised to E.164 (``+4477331234567``).

Accepted forms, each with 10 to 16 digits after the international prefix:
``+4477331234567``, ``004477331234567``, ``4477331234567``, and any of those as the local part
of ``<number>@<sms domain>`` where the domain is one of the configured ``sms.domains``. Only ASCII
digits; no spaces or punctuation (they cannot be written unquoted in an SMTP path anyway).
A national number (one leading ``0``) is refused: without a country it cannot be routed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from mailrelay.policy.addresses import AddressSyntaxError, normaliseDomain
from mailrelay.policy.decisions import Refusal, RefusalKind

MIN_DIGITS = 10
MAX_DIGITS = 16
_PHONE_SHAPED = re.compile(r"\+?[0-9]+")


class PhoneNumberError(ValueError):
    """Text that looks like a phone number but is not one mailrelay can route."""


def isPhoneShaped(text: str) -> bool:
    """Whether ``text`` is written like a phone number: ASCII digits, optionally after ``+``."""
    return _PHONE_SHAPED.fullmatch(text) is not None


def normalisePhoneNumber(text: str) -> str:
    """The E.164 form of a number written in one of the SPEC §5 forms; raises PhoneNumberError."""
    if not isPhoneShaped(text):
        raise PhoneNumberError(f"{text!r} is not a phone number (digits, optionally after +)")
    if text.startswith("+"):
        digits = text[1:]
    elif text.startswith("00"):
        digits = text[2:]
    elif text.startswith("0"):
        raise PhoneNumberError(
            f"{text} is a national number; write it in international form, like +4477331234567"
        )
    else:
        digits = text
    if digits.startswith("0"):
        raise PhoneNumberError(f"{text}: a country code never starts with 0")
    if not MIN_DIGITS <= len(digits) <= MAX_DIGITS:
        raise PhoneNumberError(
            f"{text} has {len(digits)} digits; a phone number has {MIN_DIGITS} to {MAX_DIGITS}"
        )
    return "+" + digits


@functools.lru_cache(maxsize=64)
def _normalisedDomains(domains: tuple[str, ...]) -> frozenset[str]:
    normalised = set()
    for domain in domains:
        try:
            normalised.add(normaliseDomain(domain))
        except AddressSyntaxError:
            continue  # config validation's business; an unusable domain matches nothing
    return frozenset(normalised)


def isSmsDomain(domain: str, smsDomains: Iterable[str]) -> bool:
    """Whether ``domain`` is one of ``smsDomains`` (compared in normal form)."""
    try:
        return normaliseDomain(domain) in _normalisedDomains(tuple(smsDomains))
    except AddressSyntaxError:
        return False


def phoneRecipient(text: str, smsDomains: Iterable[str] = ()) -> str | None:
    """
    The E.164 number a RCPT names, or None when ``text`` is not written as a phone number (so
    it is an e-mail address). A phone-shaped text, or anything at an SMS domain, that is not a
    valid number raises ``Refusal(BAD_RECIPIENT_SYNTAX)``.
    """
    local, at, domain = text.rpartition("@")
    if not at:
        if not isPhoneShaped(text):
            return None
        local = text
    elif not isSmsDomain(domain, smsDomains):
        return None
    try:
        return normalisePhoneNumber(local)
    except PhoneNumberError as e:
        raise Refusal(
            RefusalKind.BAD_RECIPIENT_SYNTAX, f"Recipient phone number invalid: {e}"
        ) from None
