"""
SMS submits per second through the relay's SMPP client (``SMPPGateway``) against the tests'
SMSC simulator on loopback, for a few windows of outstanding submit_sm.

Both sides run in this one process on one reactor, so the figure is the client's and the
simulator's CPU cost per submit together, not the network's; an SMSC's own answer time would
make the window matter more (``--latency`` adds one on the simulator side).

    python3 -m benchmarks.sms_bench [--messages 5000] [--windows 10,100] [--latency 0]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet import defer, task

from mailrelay.delivery.sms.gateway import SmsMessage
from mailrelay.delivery.sms.smpp import SMPPGateway, SMPPSettings
from mailrelay.model import Recipient
from tests.smsc_simulator import PASSWORD, SYSTEM_ID, startSmsc, stopSmsc


async def run(reactor: Any, messages: int, window: int, latency: float) -> float:
    smsc = await startSmsc(None, reactor)
    if latency:
        original = smsc.buildProtocol

        def slow(addr: Any) -> Any:
            protocol = original(addr)
            submit = protocol._submit
            protocol._submit = lambda packet: reactor.callLater(latency, submit, packet)
            return protocol

        smsc.buildProtocol = slow
    gateway = SMPPGateway(
        SMPPSettings("127.0.0.1", smsc.port.getHost().port, SYSTEM_ID, PASSWORD, window=window),
        reactor,
    )
    gateway.startService()
    await gateway.whenBound()
    to = Recipient("+4477331234567", "sms")
    started = time.perf_counter()
    results = await defer.DeferredList(
        [
            gateway.submit(SmsMessage(str(i), to, "+393331234567", f"benchmark text {i}"))
            for i in range(messages)
        ]
    )
    elapsed = time.perf_counter() - started
    accepted = sum(1 for ok, s in results if ok and s.kind == "delivered")
    await gateway.stopService()
    await stopSmsc(smsc)
    if accepted != messages:
        raise SystemExit(f"only {accepted} of {messages} accepted")
    return messages / elapsed


def main(reactor: Any, args: argparse.Namespace) -> defer.Deferred[None]:
    async def go() -> None:
        for window in [int(w) for w in args.windows.split(",")]:
            rate = await run(reactor, args.messages, window, args.latency)
            print(
                f"window {window:>4}: {rate:,.0f} submit_sm/s "
                f"({args.messages} messages, SMSC latency {args.latency * 1000:.0f} ms)"
            )

    return defer.Deferred.fromCoroutine(go())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--windows", default="10,100")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per submit_sm_resp")
    task.react(main, [parser.parse_args()])
