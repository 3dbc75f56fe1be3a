"""
Shared by the policy tests: asserting a refusal by its reply codes, and a few account values.
(No tests here; trial collects nothing from this module.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailrelay.model import Account, Sender
from mailrelay.policy.decisions import Refusal
from mailrelay.smtp.refusals import replyFor
from mailrelay.smtp.replies import Refused, Reply


class RefusalMixin:
    """``assertRefused``: the call raises a policy Refusal that the SMTP edge answers with
    exactly ``reply``'s codes (or, from the SMTP edge's own parsers, Refused with them); it
    returns the answer as ``Refused`` (``e.reply`` is the reply sent)."""

    def assertRefused(
        self, reply: Reply, f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Refused:
        try:
            result = f(*args, **kwargs)
        except Refusal as refusal:
            e = Refused(replyFor(refusal))
        except Refused as refused:
            e = refused
        else:
            raise AssertionError(f"not refused; returned {result!r}")
        got = (e.reply.code, e.reply.enhanced)
        expected = (reply.code, reply.enhanced)
        if got != expected:
            raise AssertionError(f"refused with {got} ({e.reply.text}), not {expected}")
        return e


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
