"""
How much and from where an account may submit: message rate, daily quota, client networks.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from mailrelay.model import Account
from mailrelay.policy.decisions import Refusal, RefusalKind

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RateLimiter:
    """
    A token bucket per account: ``account.rate_per_second`` tokens flow in each second, up to
    a burst of ``max(1, rate)``; each message takes one. An account with no rate (None or not
    above 0) is not limited. ``seconds`` is the clock (``reactor.seconds`` or a ``task.Clock``).
    The state is this process's: several relay instances each allow the full rate. ``share``
    is this process's part of it when one relay runs several worker processes (``1 / workers``:
    together they never allow more than the account's rate).
    """

    def __init__(self, seconds: Callable[[], float], share: float = 1.0) -> None:
        self._seconds = seconds
        self._share = share
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, account: Account) -> bool:
        """Whether ``account`` may submit one more message now; takes a token when it may."""
        rate = account.rate_per_second
        if rate is None or rate <= 0:
            return True
        rate *= self._share
        burst = max(1.0, rate)
        now = self._seconds()
        tokens, last = self._buckets.get(account.name, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - last) * rate)
        if tokens < 1:
            self._buckets[account.name] = (tokens, now)
            return False
        self._buckets[account.name] = (tokens - 1, now)
        return True

    def check(self, account: Account) -> None:
        """:meth:`allow`, raising ``Refusal(RATE_LIMITED)`` when it says no."""
        if not self.allow(account):
            raise Refusal(
                RefusalKind.RATE_LIMITED,
                f"Account {account.name} may send {account.rate_per_second:g} messages "
                "per second; try again later",
            )


def startOfDay(now: datetime) -> datetime:
    """Midnight UTC of ``now``'s day: the start of the period the daily quota counts."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def checkDailyQuota(account: Account, acceptedToday: int) -> None:
    """
    Whether one more message fits in the account's daily quota, given how many were accepted
    since :func:`startOfDay`; raises ``Refusal(QUOTA_EXCEEDED)`` when it does not.
    """
    quota = account.daily_quota
    if quota is not None and acceptedToday >= quota:
        raise Refusal(
            RefusalKind.QUOTA_EXCEEDED,
            f"Daily quota of {quota} messages reached for account {account.name}; "
            "it resets at midnight UTC",
        )


@functools.lru_cache(maxsize=1024)
def _network(text: str) -> Network | None:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None  # registration validates; an unreadable network admits nobody


def _address(ip: str) -> Address | None:
    try:
        address = ipaddress.ip_address(ip.strip().strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _matching(account: Account, address: Address) -> Iterable[Network]:
    for text in account.networks:
        network = _network(text)
        if network is not None and address.version == network.version and address in network:
            yield network


def clientAllowed(account: Account, ip: str) -> bool:
    """
    Whether a client at ``ip`` may log in as ``account``: anywhere when the account names no
    networks, else only from inside one of them (IPv4-mapped IPv6 counts as IPv4). A client
    address that is not an IP (a UNIX socket) is outside every network.
    """
    if not account.networks:
        return True
    address = _address(ip)
    return address is not None and any(True for _ in _matching(account, address))


class NetworkIndex:
    """
    The enabled accounts by client network, for relay by IP (``auth = "network"``): finding
    the account of a client costs a dictionary lookup per distinct prefix length, however many
    accounts there are (a scan of every account's networks would cost each new connection
    more the more customers the relay has).
    """

    def __init__(self, accounts: Iterable[Account]) -> None:
        self._accounts: dict[str, Account] = {}
        # (IP version, prefix length) -> network address as an integer -> account names
        self._networks: dict[tuple[int, int], dict[int, set[str]]] = {}
        for account in accounts:
            if not account.enabled:
                continue
            for text in account.networks:
                network = _network(text)
                if network is None:
                    continue
                key = (network.version, network.prefixlen)
                names = self._networks.setdefault(key, {}).setdefault(
                    int(network.network_address), set()
                )
                names.add(account.name)
                self._accounts[account.name] = account
        self._longestFirst = sorted(self._networks, key=lambda key: -key[1])

    def accountFor(self, ip: str) -> Account | None:
        """
        The account a client at ``ip`` submits as without AUTH: the enabled account with the
        most specific network (longest prefix) containing ``ip``. None when no account's
        network contains it, or when two accounts share the most specific match: an ambiguous
        setup must not guess whose mail it is, so the client has to AUTH.
        """
        address = _address(ip)
        if address is None:
            return None
        value = int(address)
        for version, prefix in self._longestFirst:
            if version != address.version:
                continue
            hostBits = address.max_prefixlen - prefix
            names = self._networks[version, prefix].get(value >> hostBits << hostBits)
            if names:
                # Two networks of one length that both hold the address are the same network.
                return self._accounts[next(iter(names))] if len(names) == 1 else None
        return None


def accountForNetwork(accounts: Iterable[Account], ip: str) -> Account | None:
    """:meth:`NetworkIndex.accountFor` over ``accounts`` (an index built for one lookup)."""
    return NetworkIndex(accounts).accountFor(ip)
