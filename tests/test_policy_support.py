"""
Shared by the policy tests: asserting a refusal by its reply codes, and a few account values.
(No tests here; trial collects nothing from this module.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailrelay.model import Account, Sender
from mailrelay.smtp.replies import Refused, Reply


class RefusalMixin:
    """``assertRefused``: the call raises Refused with exactly ``reply``'s codes."""

    def assertRefused(
        self, reply: Reply, f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Refused:
        try:
            result = f(*args, **kwargs)
        except Refused as e:
            got = (e.reply.code, e.reply.enhanced)
            expected = (reply.code, reply.enhanced)
            if got != expected:
                message = f"refused with {got} ({e.reply.text}), not {expected}"
                raise AssertionError(message) from e
            return e
        raise AssertionError(f"not refused; returned {result!r}")


def account(**changes: Any) -> Account:
    """An account named ``acme`` with the given settings."""
    return Account(name="acme", password_hash="$argon2id$test", **changes)


SENDERS = (
    Sender("acme", "example.com", "domain"),
    Sender("acme", "alerts@example.net", "address"),
    Sender("acme", "bücher.de", "domain"),
    Sender("acme", "+393331234567", "sms"),
    Sender("acme", "ACME", "sms"),
    Sender("other", "other.example", "domain"),
)
