"""
Intake flow control, Postfix's ``in_flow_delay``: when messages arrive faster than this
process delivers them, a new message waits (up to ``[limits] in_flow_delay``) before its
``MAIL`` is answered, so that the queue stops growing instead of the intake taking the CPU the
delivery needs.

Tokens stand for room in the delivery loop: each ``MAIL`` takes one, and the loop gives one
back for each notification it claims; when a claim finds nothing more due (the loop has caught
up) the tokens are filled up again, which also returns those of transactions that never stored
a message. With no token left a ``MAIL`` waits for one, but never longer than the delay: the
intake slows down, it never stops.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class InFlow:
    """Up to ``capacity`` tokens; a taker without one waits up to ``delay`` seconds."""

    def __init__(self, clock: IReactorTime, delay: float, capacity: int) -> None:
        self._clock = clock
        self.delay = delay
        self.capacity = capacity
        self.tokens = capacity
        self._waiting: deque[tuple[Deferred[None], IDelayedCall]] = deque()

    @property
    def waiting(self) -> int:
        """Takers waiting for a token now."""
        return len(self._waiting)

    def take(self) -> Deferred[None] | None:
        """None to go on at once (a token was taken, or flow control is off), else a Deferred
        that fires when a token comes back or the delay is over."""
        if self.tokens > 0 and not self._waiting:
            self.tokens -= 1
            return None
        if self.delay <= 0:
            return None
        waiter: Deferred[None] = Deferred()
        timer = self._clock.callLater(self.delay, self._timedOut, waiter)
        self._waiting.append((waiter, timer))
        return waiter

    def give(self, count: int) -> None:
        """``count`` notifications left the intake's backlog: as many tokens come back."""
        self.tokens = min(self.capacity, self.tokens + count)
        while self._waiting and self.tokens > 0:
            waiter, timer = self._waiting.popleft()
            timer.cancel()
            self.tokens -= 1
            waiter.callback(None)

    def refill(self) -> None:
        """The loop has caught up: every token is free again."""
        self.give(self.capacity)

    def open(self) -> None:
        """Let every waiter go on (the loop stops): nothing will give tokens back."""
        while self._waiting:
            waiter, timer = self._waiting.popleft()
            timer.cancel()
            waiter.callback(None)

    def _timedOut(self, waiter: Deferred[None]) -> None:
        for entry in self._waiting:
            if entry[0] is waiter:
                self._waiting.remove(entry)
                break
        waiter.callback(None)
