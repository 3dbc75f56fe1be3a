"""
The SMTP sessions open in one relay process, so that a stop can drain them.

A drain (SIGTERM) tells every session to finish: one idle in command mode is closed at once
with ``421 4.3.2``; one whose command is being decided, or which is inside DATA, finishes that
(the message is stored and answered) and gets the 421 at its next command. Sessions still open
at the deadline are closed (with a 421 where one can still be said); after that the store
may close.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


class Drainable(Protocol):
    def drain(self) -> None:
        """Finish what is under way, then close with 421 4.3.2 (at once if idle)."""

    def abortForShutdown(self) -> None:
        """Close now: the drain's deadline has passed."""


class SessionRegistry:
    """The open sessions of one process (every listener's)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._open: set[Drainable] = set()
        self.draining = False
        self._waiting: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._open)

    def add(self, session: Drainable) -> None:
        self._open.add(session)

    def discard(self, session: Drainable) -> None:
        self._open.discard(session)
        if not self._open and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def drain(self, deadline: float) -> Deferred[int]:
        """Ask every session to finish, and fire once none is open, or after ``deadline``
        seconds, when the rest are closed; the Deferred's result is how many were closed at
        the deadline. New sessions (a connection accepted meanwhile) are told at once."""
        self.draining = True
        for session in list(self._open):
            session.drain()
        if not self._open:
            return succeed(0)
        log.info(
            "draining {count} SMTP sessions (at most {deadline} s)",
            count=len(self._open),
            deadline=deadline,
        )
        empty: Deferred[None] = Deferred()
        self._waiting.append(empty)
        done: Deferred[int] = Deferred()
        timer = self._clock.callLater(deadline, self._expire, empty, done)

        def drained(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(0)

        empty.addCallback(drained)
        return done

    def _expire(self, empty: Deferred[None], done: Deferred[int]) -> None:
        remaining = list(self._open)
        if empty in self._waiting:
            self._waiting.remove(empty)
        log.warn(
            "drain deadline passed: closing {count} SMTP sessions still open",
            count=len(remaining),
        )
        for session in remaining:
            session.abortForShutdown()
        done.callback(len(remaining))
