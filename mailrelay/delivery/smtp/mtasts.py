"""
MTA-STS (RFC 8461): whether a recipient domain asks for verified TLS to its MX hosts.

A domain opts in with a TXT record at ``_mta-sts.<domain>`` (``v=STSv1; id=…``) and serves its
policy at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. Policies are cached for their
``max_age`` and refetched only when the TXT id changes; a cached policy outlives DNS and HTTPS
failures (that is what stops an attacker from stripping the TXT record or blocking the fetch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, cast

import treq
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dnserror
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgent, IResponse

from mailrelay.delivery.route import Candidate, TLSPolicy

log = Logger()

MAX_POLICY_BYTES = 64 * 1024
FETCH_TIMEOUT = 15
MAX_AGE_CAP = 31557600
"""A year, the largest ``max_age`` RFC 8461 allows; no policy is cached longer."""

Mode = Literal["enforce", "testing", "none"]

_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class MTASTSPolicy:
    """A domain's policy: ``mode``, the MX host patterns it names, how long (seconds) it may
    be cached, and the TXT record id it was fetched under."""

    mode: Mode
    mx: tuple[str, ...]
    maxAge: int
    policyId: str

    def allowsHost(self, mxHost: str) -> bool:
        """Whether ``mxHost`` matches one of the policy's ``mx`` patterns (RFC 8461 §4.1): the
        same name, or for ``*.example.com`` a name with exactly one more label on the left;
        without case or trailing dot."""
        host = mxHost.rstrip(".").lower()
        for pattern in self.mx:
            pattern = pattern.rstrip(".").lower()
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def tlsFor(
    policy: MTASTSPolicy | None, candidates: list[Candidate]
) -> tuple[list[Candidate], TLSPolicy]:
    """
    The candidates and TLS a domain's policy asks for: ``enforce`` keeps only the MX hosts
    the policy names and requires verified TLS (RFC 8461 §5); ``testing``, ``none`` and no
    policy change nothing (opportunistic STARTTLS to every candidate). An enforce policy that
    names none of the candidates leaves an empty list: there is nowhere to deliver.
    """
    if policy is None or policy.mode != "enforce":
        return candidates, TLSPolicy("opportunistic")
    return [one for one in candidates if policy.allowsHost(one.host)], TLSPolicy("verify")


class PolicyError(Exception):
    """A TXT record or a policy file that is not RFC 8461's syntax, or a fetch that failed."""


def parseTXT(strings: list[bytes]) -> str:
    """The ``id`` of one ``_mta-sts`` TXT record (its strings joined); raises PolicyError
    when the record is not ``v=STSv1; id=…``."""
    try:
        text = b"".join(strings).decode("ascii")
    except UnicodeDecodeError:
        raise PolicyError("TXT record is not ASCII") from None
    fields = [field.strip(" \t") for field in text.split(";")]
    if fields[-1] == "":
        fields.pop()
    if not fields or fields[0] != "v=STSv1":
        raise PolicyError(f"TXT record {text!r} does not begin with v=STSv1")
    ids = [field[3:] for field in fields[1:] if field.startswith("id=")]
    if len(ids) != 1 or not _TXT_ID.fullmatch(ids[0]):
        raise PolicyError(f"TXT record {text!r}: expected one id of 1-32 letters and digits")
    return ids[0]


def parsePolicy(body: bytes, policyId: str) -> MTASTSPolicy:
    """The policy a ``mta-sts.txt`` body states (RFC 8461 §3.2); raises PolicyError when a
    required field is missing or wrong. Unknown fields are ignored; of a repeated field other
    than ``mx``, the first counts."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("policy is not UTF-8") from None
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"policy line {line!r} is not key: value")
        key, value = key.strip(), value.strip(" \t")
        if key == "mx":
            mx.append(value)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("policy version is not STSv1")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"policy mode {mode!r} is not enforce, testing or none")
    maxAge = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(maxAge) or int(maxAge) > MAX_AGE_CAP:
        raise PolicyError(f"policy max_age {maxAge!r} is not 0 to {MAX_AGE_CAP}")
    if mode != "none" and not mx:
        raise PolicyError(f"policy mode {mode} names no mx")
    return MTASTSPolicy(cast(Mode, mode), tuple(mx), int(maxAge), policyId)


@dataclass(frozen=True)
class _Cached:
    policy: MTASTSPolicy
    expires: float


class _CappedBody(Protocol):
    """Collects a response body of at most ``limit`` bytes into ``finished``; a longer one
    fails with PolicyError and its connection is dropped."""

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()  # type: ignore[union-attr]
            self.finished.errback(PolicyError(f"policy is longer than {self.limit} bytes"))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)


def _readBody(response: IResponse, limit: int) -> Deferred[bytes]:
    protocol: _CappedBody

    def cancel(d: Deferred[bytes]) -> None:
        # A timeout while the body trickles in: drop the connection, not only the wait.
        if protocol.transport is not None:
            protocol.transport.stopProducing()  # type: ignore[attr-defined]

    finished: Deferred[bytes] = Deferred(cancel)
    protocol = _CappedBody(finished, limit)
    response.deliverBody(protocol)
    return finished


def _drop(response: IResponse) -> None:
    """Close the connection of a response whose body is of no use."""
    reading = _readBody(response, 0)
    reading.addErrback(lambda _: None)
    reading.cancel()


class MTASTSPolicies:
    """
    The MTA-STS policies of recipient domains: TXT records through ``resolver``, policy files
    through ``agent`` (an SSRF-safe one, :func:`~mailrelay.delivery.smtp.safeagent.safeAgent`,
    which also verifies the certificate), cache expiry and fetch timeouts by ``clock``.
    ``httpsPort`` is for tests: a policy host on another port than 443.
    """

    def __init__(
        self, resolver: IResolver, agent: IAgent, clock: IReactorTime, httpsPort: int = 443
    ) -> None:
        # Any: IResolver declares timeout required, twisted.names types no records.
        self._resolver: Any = resolver
        self._client = treq.client.HTTPClient(agent)
        self._clock = clock
        self._httpsPort = httpsPort
        self._cache: dict[str, _Cached] = {}
        self._pending: dict[str, list[Deferred[MTASTSPolicy | None]]] = {}

    def policyFor(self, domain: str) -> Deferred[MTASTSPolicy | None]:
        """
        The policy in force for ``domain``, or None when it has none. Never fails: when the
        TXT lookup or the fetch fails, or the policy is malformed, a cached policy that has not
        expired stays in force, and without one the answer is None. Concurrent calls for one
        domain share one lookup.
        """
        domain = domain.rstrip(".").lower()
        waiter: Deferred[MTASTSPolicy | None] = Deferred()
        waiters = self._pending.get(domain)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._pending[domain] = [waiter]

        def unexpected(failure: Failure) -> MTASTSPolicy | None:
            log.failure("MTA-STS {domain}", failure, domain=domain)
            return self._cached(domain)

        def done(result: MTASTSPolicy | None) -> None:
            for one in self._pending.pop(domain):
                one.callback(result)

        ensureDeferred(self._policyFor(domain)).addErrback(unexpected).addCallback(done)
        return waiter

    def _cached(self, domain: str) -> MTASTSPolicy | None:
        entry = self._cache.get(domain)
        if entry is None:
            return None
        if entry.expires <= self._clock.seconds():
            del self._cache[domain]
            return None
        return entry.policy

    async def _policyFor(self, domain: str) -> MTASTSPolicy | None:
        try:
            policyId = await self._txtId(domain)
        except Exception:
            log.info(
                "MTA-STS {domain}: TXT lookup: {error}",
                domain=domain,
                error=Failure().getErrorMessage(),
            )
            return self._cached(domain)
        if policyId is None:
            # No record now; a cached policy still holds until it expires (RFC 8461 §5.1),
            # or stripping the TXT record would turn enforcement off.
            return self._cached(domain)
        cached = self._cached(domain)
        if cached is not None and cached.policyId == policyId:
            return cached
        try:
            policy = await self._fetch(domain, policyId)
        except Exception:
            log.warn(
                "MTA-STS {domain}: policy id {policyId}: {error}; {keeping}",
                domain=domain,
                policyId=policyId,
                error=Failure().getErrorMessage(),
                keeping="keeping the cached policy" if cached else "no policy",
            )
            return cached
        expires = self._clock.seconds() + min(policy.maxAge, MAX_AGE_CAP)
        self._cache[domain] = _Cached(policy, expires)
        log.info(
            "MTA-STS {domain}: {mode} policy {policyId} for {maxAge} s",
            domain=domain,
            mode=policy.mode,
            policyId=policyId,
            maxAge=policy.maxAge,
        )
        return policy

    async def _txtId(self, domain: str) -> str | None:
        """The id of ``_mta-sts.<domain>``'s record, or None when there is no (single,
        valid) STSv1 record."""
        try:
            result: Any = await self._resolver.lookupText(f"_mta-sts.{domain}")
        except Exception:
            failure = Failure()
            if failure.check(dnserror.DNSNameError, dnserror.AuthoritativeDomainError):
                return None
            raise
        answers: list[Any] = result[0]
        records = [
            answer.payload.data
            for answer in answers
            if answer.type == dns.TXT and b"".join(answer.payload.data).startswith(b"v=STSv1")
        ]
        if len(records) != 1:
            # None or several: RFC 8461 §3.1 says the domain then has no policy.
            return None
        try:
            return parseTXT(records[0])
        except PolicyError as e:
            log.info("MTA-STS {domain}: {error}", domain=domain, error=str(e))
            return None

    async def _fetch(self, domain: str, policyId: str) -> MTASTSPolicy:
        port = "" if self._httpsPort == 443 else f":{self._httpsPort}"
        url = f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"
        fetching = ensureDeferred(self._get(url))
        # Cancelling drops the connection, whether waiting for the headers or the body.
        fetching.addTimeout(FETCH_TIMEOUT, self._clock)
        try:
            body = await fetching
        except defer.TimeoutError:
            raise PolicyError(f"{url}: no policy within {FETCH_TIMEOUT} s") from None
        return parsePolicy(body, policyId)

    async def _get(self, url: str) -> bytes:
        # No redirects (RFC 8461 §3.3) and no buffering: the body is read under a cap.
        response = await self._client.get(url, allow_redirects=False, unbuffered=True)
        if response.code != 200:
            _drop(response)
            raise PolicyError(f"{url}: HTTP {response.code}")
        contentType = response.headers.getRawHeaders(b"content-type", [b""])[0]
        if contentType.split(b";")[0].strip().lower() != b"text/plain":
            _drop(response)
            raise PolicyError(f"{url}: Content-Type {contentType!r}, not text/plain")
        return await _readBody(response, MAX_POLICY_BYTES)
