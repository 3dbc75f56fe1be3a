"""
Failed-login throttling per client address and per account, shared by SMTP AUTH and HTTP
Basic auth.

After ``maxFailures`` failures from one address within ``window`` seconds, that address is
refused without checking credentials until the window has passed. A successful login does not
clear the count: a client with an account of its own could otherwise guess at another's
password without end, logging in as itself after every few guesses. Entries are forgotten
lazily, and the table is bounded so that a flood of addresses cannot grow it without limit.

Guesses at one account spread over many addresses (each under the per-address limit) are
counted per account too: after ``maxAccountFailures`` failures at one account within
``window``, logins to it are refused for the rest of the window -- except from addresses that
logged in to it successfully within ``trustedFor`` seconds, so the owner is not locked out by
an attacker (OWASP's "lockout without denial of service"). The SMTP edge answers a refused
login ``454 4.7.0``, the HTTP edge ``429``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

FAILED_LOGINS_PER_CLIENT = 10
"""Failed logins from one address (within the window) before its logins are refused."""
FAILED_LOGINS_PER_ACCOUNT = 20
"""Failed logins to one account from any addresses (within the window) before logins to it
from addresses it was not recently used from are refused."""
TRUSTED_FOR = 7 * 86400.0
"""Seconds an address that logged in to an account stays exempt from that account's limit."""


class LoginThrottle:
    def __init__(
        self,
        seconds: Callable[[], float],
        maxFailures: int = FAILED_LOGINS_PER_CLIENT,
        window: float = 300.0,
        maxAddresses: int = 100_000,
        maxAccountFailures: int = FAILED_LOGINS_PER_ACCOUNT,
        trustedFor: float = TRUSTED_FOR,
    ) -> None:
        self._seconds = seconds
        self._maxFailures = maxFailures
        self._window = window
        self._maxAddresses = maxAddresses
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._maxAccountFailures = maxAccountFailures
        self._trustedFor = trustedFor
        self._accountFailures: OrderedDict[str, tuple[float, int]] = OrderedDict()
        # (account, address) -> when it last logged in; bounded like the failures.
        self._trusted: OrderedDict[tuple[str, str], float] = OrderedDict()

    def blocked(self, address: str) -> bool:
        """Whether logins from ``address`` are refused right now."""
        entry = self._failures.get(address)
        if entry is None:
            return False
        first, count = entry
        if self._seconds() - first > self._window:
            del self._failures[address]
            return False
        return count >= self._maxFailures

    def failed(self, address: str, account: str | None = None) -> None:
        """Record a failed login from ``address``, to ``account`` if named (None: a login
        that names no account, an API key)."""
        self._count(self._failures, address)
        if account is not None:
            self._count(self._accountFailures, _accountKey(account))

    def _count(self, table: OrderedDict[str, tuple[float, int]], key: str) -> None:
        now = self._seconds()
        first, count = table.pop(key, (now, 0))
        if now - first > self._window:
            first, count = now, 0
        table[key] = (first, count + 1)
        while len(table) > self._maxAddresses:
            table.popitem(last=False)

    def accountBlocked(self, account: str, address: str) -> bool:
        """Whether a login to ``account`` from ``address`` is refused right now: the account
        drew too many failures within the window and ``address`` is not one it was recently
        logged in to from."""
        account = _accountKey(account)
        entry = self._accountFailures.get(account)
        if entry is None:
            return False
        first, count = entry
        if self._seconds() - first > self._window:
            del self._accountFailures[account]
            return False
        if count < self._maxAccountFailures:
            return False
        lastLogin = self._trusted.get((account, address))
        return lastLogin is None or self._seconds() - lastLogin > self._trustedFor

    def succeeded(self, account: str, address: str) -> None:
        """Record a successful login to ``account`` from ``address``: that address stays
        exempt from the account's limit for ``trustedFor`` seconds."""
        key = (_accountKey(account), address)
        self._trusted.pop(key, None)
        self._trusted[key] = self._seconds()
        while len(self._trusted) > self._maxAddresses:
            self._trusted.popitem(last=False)


def _accountKey(account: str) -> str:
    # Guesses at "Acme" and "ACME" are guesses at one account wherever names compare so.
    return account.casefold()
