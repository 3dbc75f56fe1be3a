"""
The ``mailrelay`` admin console script (SPEC §9): accounts, API keys, senders, status, the
delivery queue, DKIM keys.

``mailrelay [--config FILE] COMMAND ...`` reads the same configuration file as the server and
opens the same store (SQLite allows both at once). Each command is one small function below;
listing commands take ``--json`` and then print one JSON document. Success exits 0; a failure
prints one line on stderr and exits 1 (2 for a command line that does not parse).

Secrets: a password is read without echo (or from stdin with ``--password-stdin``) and only its
Argon2 hash is stored; an API key is printed once and only its SHA-256 is stored. Neither hash
is ever printed, nor is a DKIM private key (``dkim generate`` prints the public DNS record).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import ipaddress
import json
import os
import pwd
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO, get_args

from twisted.internet import task

from mailrelay.auth.secrets import hashPassword, newApiKey
from mailrelay.config import DEFAULT_CONFIG_FILE, Config, ConfigError, loadConfigSource
from mailrelay.files import keepFilesPrivate
from mailrelay.interfaces import AlreadyExists, IStore, NotFound, StoreError
from mailrelay.message.dkim import DkimError, dnsRecord, generateKey
from mailrelay.model import (
    API_KEY_USER,
    Account,
    DkimAlgorithm,
    DkimKey,
    QueueItem,
    QueueState,
    Sender,
    SenderKind,
    utcnow,
)
from mailrelay.policy.addresses import AddressSyntaxError, normaliseDomain, parseMailbox
from mailrelay.policy.senders import SenderIdError, normaliseSenderId
from mailrelay.status import formatTimestamp, statusDocument
from mailrelay.store import makeStore, sqlitePath

PROG = "mailrelay"
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[IStore, argparse.Namespace, "Console"], Awaitable[None]]


class CommandError(Exception):
    """A command cannot be done; the message is the one line printed on stderr."""


# -- argument types: each turns one command-line word into a value, or refuses it --


_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def accountName(text: str) -> str:
    """A name for a new account: it is the SMTP user name and part of the status API's URL."""
    if not _ACCOUNT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid account name {text!r}: use 1-64 letters, digits, '.', '_' or '-'"
        )
    if text.lower() == API_KEY_USER.lower():
        raise argparse.ArgumentTypeError(f"{text!r} is reserved for API-key logins")
    return text


def onOff(text: str) -> bool:
    """``on`` or ``off``."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")
    return text == "on"


def positiveInt(text: str) -> int:
    """A whole number greater than 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {value}")
    return value


def optionalLimit(text: str) -> int | None:
    """A positive whole number, or ``none`` to remove the account's own limit."""
    return None if text == "none" else positiveInt(text)


def smsCredits(text: str) -> int | None:
    """Prepaid SMS credits (segments) left: a whole number from 0, or ``none`` for no
    prepaid limit."""
    if text == "none":
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise argparse.ArgumentTypeError(f"not a number of credits: {text!r}")
    return int(text)


def smsSegments(text: str) -> int:
    """How many SMS segments a message may use: 1 to 255."""
    value = positiveInt(text)
    if value > 255:
        raise argparse.ArgumentTypeError(f"at most 255 segments, not {value}")
    return value


_RATE = re.compile(r"(\d+(?:\.\d+)?)/s")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escapeControl(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def rate(text: str) -> float | None:
    """A message rate written ``N/s`` (messages per second), or ``none`` for no limit."""
    if text == "none":
        return None
    match = _RATE.fullmatch(text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a rate like 10/s (or none), not {text!r}")
    return float(match.group(1))


def networks(text: str) -> tuple[str, ...]:
    """Comma-separated CIDR networks in normal form; ``none`` (or an empty string): none,
    as for the other limits."""
    if text.strip() == "none":
        return ()
    result = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            result.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a network (CIDR): {item!r}") from None
    return tuple(result)


def senderValue(text: str) -> tuple[SenderKind, str]:
    """
    What a sender argument registers, and its normal form (the one the sender policy compares):
    with an ``@`` an address; digits (optionally after ``+``, at most 16) or at most 11 letters
    and digits an SMS sender id; else a domain name with a dot.
    """
    try:
        if "@" in text:
            return "address", str(parseMailbox(text))
        try:
            return "sms", normaliseSenderId(text)
        except SenderIdError:
            pass
        if "." in text and not text.startswith("["):
            return "domain", normaliseDomain(text)
    except AddressSyntaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    raise argparse.ArgumentTypeError(
        f"{text!r} is neither a domain, an address nor an SMS sender id "
        "(up to 16 digits, or up to 11 letters and digits)"
    )


def signingDomain(text: str) -> str:
    """A domain name to sign for with DKIM, in normal form (lower-case, IDNA A-labels)."""
    try:
        if "." in text and not text.startswith("["):
            return normaliseDomain(text)
    except AddressSyntaxError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    raise argparse.ArgumentTypeError(f"not a domain name: {text!r}")


# -- output --


@dataclass
class Console:
    """Where commands read and write: the process's own streams, or a test's."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    stdin: TextIO = field(default_factory=lambda: sys.stdin)

    def say(self, line: str) -> None:
        print(line, file=self.out)

    def fail(self, message: str) -> None:
        """The one line on stderr that says why a command failed."""
        print(f"{PROG}: {' '.join(message.split())}", file=self.err)

    def printJson(self, document: Any) -> None:
        self.say(json.dumps(document, indent=2, ensure_ascii=False))

    def printTable(self, rows: Sequence[Sequence[str]]) -> None:
        """Rows as left-aligned columns; control characters (which a stored value from a
        client could carry to the operator's terminal) shown as ``\\xNN``."""
        rows = [[_CONTROL.sub(_escapeControl, cell) for cell in row] for row in rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            self.say("  ".join(cells).rstrip())

    def askPassword(self, prompt: str) -> str:
        """Ask on the terminal, without echo."""
        return getpass.getpass(prompt)


def accountSettings(account: Account) -> dict[str, Any]:
    """An account's settings for display: every field but the password hash."""
    settings = dataclasses.asdict(account)
    del settings["password_hash"]
    settings["networks"] = list(account.networks)
    return settings


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return ",".join(value) or "any"
    return str(value)


async def existingAccount(store: IStore, name: str) -> Account:
    """The account named ``name``; CommandError if there is none."""
    account = await store.getAccount(name)
    if account is None:
        raise CommandError(f"unknown account: {name}")
    return account


# -- steps before the store is opened --


def readPassword(args: argparse.Namespace, console: Console) -> None:
    """``account add`` and ``account password``: read the new password (never echoed) and
    hash it."""
    if args.password_stdin:
        password = console.stdin.readline().rstrip("\r\n")
    else:
        password = console.askPassword("Password: ")
        if console.askPassword("Repeat password: ") != password:
            raise CommandError("the passwords do not match")
    if not password:
        raise CommandError("empty password refused")
    args.passwordHash = hashPassword(password)


ACCOUNT_SETTINGS = tuple(
    f.name
    for f in dataclasses.fields(Account)
    if f.name not in ("name", "password_hash", "enabled")
)
"""The Account fields ``account set`` changes; its options use these names as ``dest``."""


def collectSettings(args: argparse.Namespace, console: Console) -> None:
    """``account set``: the settings given (options not given are absent from ``args``)."""
    args.changes = {name: getattr(args, name) for name in ACCOUNT_SETTINGS if hasattr(args, name)}
    if not args.changes:
        raise CommandError("account set: nothing to set; give at least one option")


# -- the commands --


async def accountAdd(store: IStore, args: argparse.Namespace, console: Console) -> None:
    try:
        await store.addAccount(args.name, args.passwordHash)
    except AlreadyExists:
        raise CommandError(f"account {args.name} exists already") from None
    console.say(f"account {args.name} added")


async def accountList(store: IStore, args: argparse.Namespace, console: Console) -> None:
    accounts = await store.listAccounts()
    if args.json:
        console.printJson([accountSettings(account) for account in accounts])
    elif accounts:
        console.printTable(
            [("NAME", "STATUS", "SMS")]
            + [
                (a.name, "enabled" if a.enabled else "disabled", _shown(a.sms_enabled))
                for a in accounts
            ]
        )
    else:
        console.say("no accounts")


async def accountShow(store: IStore, args: argparse.Namespace, console: Console) -> None:
    settings = accountSettings(await existingAccount(store, args.name))
    if args.json:
        console.printJson(settings)
    else:
        console.printTable([(f"{key}:", _shown(value)) for key, value in settings.items()])


async def _setEnabled(store: IStore, name: str, enabled: bool, console: Console) -> None:
    account = await existingAccount(store, name)
    await store.updateAccount(dataclasses.replace(account, enabled=enabled))
    console.say(f"account {name} {'enabled' if enabled else 'disabled'}")


async def accountDisable(store: IStore, args: argparse.Namespace, console: Console) -> None:
    await _setEnabled(store, args.name, False, console)


async def accountEnable(store: IStore, args: argparse.Namespace, console: Console) -> None:
    await _setEnabled(store, args.name, True, console)


async def accountPassword(store: IStore, args: argparse.Namespace, console: Console) -> None:
    account = await existingAccount(store, args.name)
    await store.updateAccount(dataclasses.replace(account, password_hash=args.passwordHash))
    console.say(
        f"password of account {args.name} changed "
        "(SMTP sessions logged in with the old one end within seconds)"
    )


async def accountSet(store: IStore, args: argparse.Namespace, console: Console) -> None:
    account = await existingAccount(store, args.name)
    await store.updateAccount(dataclasses.replace(account, **args.changes))
    changed = ", ".join(f"{key}={_shown(value)}" for key, value in args.changes.items())
    console.say(f"account {args.name} updated: {changed}")


async def apikeyCreate(store: IStore, args: argparse.Namespace, console: Console) -> None:
    keyId, key, keyHash = newApiKey()
    try:
        await store.addApiKey(args.name, keyId, keyHash)
    except NotFound:
        raise CommandError(f"unknown account: {args.name}") from None
    console.say(key)


async def apikeyList(store: IStore, args: argparse.Namespace, console: Console) -> None:
    await existingAccount(store, args.name)
    keys = await store.listApiKeys(args.name)
    rows = [(k.key_id, formatTimestamp(k.created_at)) for k in keys]
    if args.json:
        console.printJson([{"key_id": keyId, "created_at": createdAt} for keyId, createdAt in rows])
    elif rows:
        console.printTable([("KEY ID", "CREATED (UTC)"), *rows])
    else:
        console.say(f"no API keys for {args.name}")


async def apikeyRevoke(store: IStore, args: argparse.Namespace, console: Console) -> None:
    await existingAccount(store, args.name)
    if not await store.revokeApiKey(args.name, args.keyid):
        raise CommandError(f"account {args.name} has no active API key {args.keyid}")
    console.say(f"API key {args.keyid} revoked")


async def senderAdd(store: IStore, args: argparse.Namespace, console: Console) -> None:
    kind, value = args.sender
    try:
        await store.addSender(Sender(account=args.name, value=value, kind=kind))
    except NotFound:
        raise CommandError(f"unknown account: {args.name}") from None
    except AlreadyExists:
        raise CommandError(f"sender {value} is registered to {args.name} already") from None
    console.say(f"sender {value} ({kind}) added to {args.name}")


async def senderList(store: IStore, args: argparse.Namespace, console: Console) -> None:
    await existingAccount(store, args.name)
    senders = await store.listSenders(args.name)
    if args.json:
        console.printJson([{"value": s.value, "kind": s.kind} for s in senders])
    elif senders:
        console.printTable([("SENDER", "KIND")] + [(s.value, s.kind) for s in senders])
    else:
        console.say(f"no senders for {args.name}")


async def senderRemove(store: IStore, args: argparse.Namespace, console: Console) -> None:
    await existingAccount(store, args.name)
    try:
        _, value = senderValue(args.sender)
    except argparse.ArgumentTypeError:
        value = args.sender  # not valid now; may still be stored as written
    if not await store.removeSender(args.name, value):
        raise CommandError(f"sender {args.sender} is not registered to {args.name}")
    console.say(f"sender {value} removed from {args.name}")


async def status(store: IStore, args: argparse.Namespace, console: Console) -> None:
    document = statusDocument(args.id, await store.statusTrail(args.id))
    events = document["SAPnotification"]["status"]
    if args.json:
        # The HTTP API's document in every case (an unknown id's has an empty list), and the
        # same exit status as without --json, so that a script can tell the two apart.
        console.printJson(document)
    elif events:
        console.printTable(
            [("TIMESTAMP (UTC)", "RECIPIENT", "STATUS", "TEXT")]
            + [(e["timestamp"], e["recipient"], e["statusCode"], e["statusText"]) for e in events]
        )
    if not events:
        raise CommandError(f"no status for notification {args.id} (unknown or expired)")


async def queueStats(store: IStore, args: argparse.Namespace, console: Console) -> None:
    stats = await store.stats()
    counts = {
        "queued": stats.queued,
        "deferred": stats.deferred,
        "in_flight": stats.in_flight,
        "held": stats.held,
    }
    if args.json:
        console.printJson(counts)
    else:
        console.printTable([(f"{state}:", str(count)) for state, count in counts.items()])


def queueItemDocument(item: QueueItem) -> dict[str, Any]:
    """A queue entry for display; ``next_attempt`` of an entry in flight is when its lease
    ends."""
    return {
        "notification_id": item.notification_id,
        "account": item.account,
        "sender": item.sender,
        "state": item.state,
        "next_attempt": formatTimestamp(item.next_attempt),
        "attempts": item.attempts,
        "pending": [recipient.key for recipient in item.pending],
        "received_at": formatTimestamp(item.received_at),
        "size": item.size,
    }


def _notQueued(notificationId: str) -> CommandError:
    return CommandError(
        f"notification {notificationId} is not in the queue "
        "(unknown, or no recipient left to deliver)"
    )


async def existingQueueItem(store: IStore, notificationId: str) -> QueueItem:
    """The queue entry of ``notificationId``; CommandError if it is not in the queue."""
    item = await store.queueItem(notificationId)
    if item is None:
        raise _notQueued(notificationId)
    return item


def _entries(count: int) -> str:
    return f"{count} queue {'entry' if count == 1 else 'entries'}"


async def queueList(store: IStore, args: argparse.Namespace, console: Console) -> None:
    if args.account is not None:
        await existingAccount(store, args.account)
    items = await store.queueItems(args.state, args.account, args.limit)
    if args.json:
        console.printJson([queueItemDocument(item) for item in items])
    elif items:
        console.printTable(
            [("ID", "STATE", "ACCOUNT", "NEXT ATTEMPT (UTC)", "ATTEMPTS", "PENDING")]
            + [
                (
                    item.notification_id,
                    item.state,
                    item.account,
                    formatTimestamp(item.next_attempt),
                    str(item.attempts),
                    str(len(item.pending)),
                )
                for item in items
            ]
        )
    else:
        console.say("the queue is empty" if args.state is None else f"no {args.state} entries")


async def queueShow(store: IStore, args: argparse.Namespace, console: Console) -> None:
    item = await existingQueueItem(store, args.id)
    document = queueItemDocument(item)
    trail = statusDocument(args.id, await store.statusTrail(args.id))["SAPnotification"]["status"]
    if args.json:
        console.printJson({**document, "status": trail})
        return
    document["pending"] = ", ".join(document["pending"])
    console.printTable([(f"{key}:", _shown(value)) for key, value in document.items()])
    if trail:
        console.say("")
        console.printTable(
            [("TIMESTAMP (UTC)", "RECIPIENT", "STATUS", "TEXT")]
            + [(e["timestamp"], e["recipient"], e["statusCode"], e["statusText"]) for e in trail]
        )


async def queueRetry(store: IStore, args: argparse.Namespace, console: Console) -> None:
    if args.id is not None:
        item = await existingQueueItem(store, args.id)
        if item.state in ("held", "in_flight"):
            state = "held (queue release it)" if item.state == "held" else "in flight"
            raise CommandError(f"notification {args.id} is {state}: not made due")
    count = await store.retryNow(args.id)
    console.say(f"{_entries(count)} due now")


async def queueDelete(store: IStore, args: argparse.Namespace, console: Console) -> None:
    await existingQueueItem(store, args.id)
    try:
        failed = await store.deleteQueued(args.id, "deleted by an operator", utcnow())
    except NotFound:
        raise _notQueued(args.id) from None
    console.say(
        f"notification {args.id} deleted: {len(failed)} "
        f"{'recipient' if len(failed) == 1 else 'recipients'} failed (CAAS_FAILED)"
    )


async def _queueTarget(store: IStore, args: argparse.Namespace) -> QueueItem | None:
    """The entry ``hold`` / ``release`` names, if it names one; CommandError if that entry or
    the account named does not exist."""
    if args.id is not None:
        return await existingQueueItem(store, args.id)
    if args.account is not None:
        await existingAccount(store, args.account)
    return None


async def queueHold(store: IStore, args: argparse.Namespace, console: Console) -> None:
    item = await _queueTarget(store, args)
    count = await store.hold(args.id, args.account)
    console.say(f"{_entries(count)} held")
    if item is not None and item.state == "in_flight":
        console.say(f"notification {args.id} is in flight: held if this attempt defers it")


async def queueRelease(store: IStore, args: argparse.Namespace, console: Console) -> None:
    await _queueTarget(store, args)
    count = await store.release(args.id, args.account)
    console.say(f"{_entries(count)} released, due now")


def defaultSelector() -> str:
    """``mr`` and the year and month (``mr202612``): a new key's selector differs from the
    last one's, so both can be published while DNS caches turn over."""
    return "mr" + utcnow().strftime("%Y%m")


def zoneFileRecord(name: str, value: str) -> str:
    """A TXT record as a zone file line: the text in quoted strings of at most 255 octets
    (an RSA key's text is longer than one may be)."""
    strings = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{name}. IN TXT ( {strings} )"


async def dkimGenerate(store: IStore, args: argparse.Namespace, console: Console) -> None:
    existing = await store.getDkimKey(args.domain)
    if existing is not None and not args.force:
        raise CommandError(
            f"{args.domain} has a DKIM key already (selector {existing.selector}, created "
            f"{formatTimestamp(existing.created_at)}); --force replaces it"
        )
    try:
        key = generateKey(args.domain, args.selector or defaultSelector(), args.algorithm, utcnow())
        name, value = dnsRecord(key)
    except DkimError as e:
        raise CommandError(str(e)) from None
    await store.putDkimKey(key)
    console.say(
        f"DKIM key for {key.domain} stored ({key.algorithm}, selector {key.selector}). "
        "Publish this DNS TXT record:"
    )
    console.printTable([("name:", name), ("value:", value)])
    console.say("")
    console.say(zoneFileRecord(name, value))
    if existing is None:
        return
    if existing.selector != key.selector:
        console.say(
            f"Keep {existing.selector}._domainkey.{existing.domain} published a few days: "
            "mail signed with the old key may still be queued or on its way."
        )
    else:
        console.say(
            "This replaces the key published under the same selector: mail signed with the "
            "old one fails verification once DNS has the new record (another --selector "
            "avoids that)."
        )


def dkimKeyDocument(key: DkimKey) -> dict[str, str]:
    """A DKIM key for display: never its private half."""
    return {
        "domain": key.domain,
        "selector": key.selector,
        "algorithm": key.algorithm,
        "created_at": formatTimestamp(key.created_at),
    }


async def dkimList(store: IStore, args: argparse.Namespace, console: Console) -> None:
    keys = [dkimKeyDocument(key) for key in await store.listDkimKeys()]
    if args.json:
        console.printJson(keys)
    elif keys:
        console.printTable(
            [("DOMAIN", "SELECTOR", "ALGORITHM", "CREATED (UTC)")]
            + [(k["domain"], k["selector"], k["algorithm"], k["created_at"]) for k in keys]
        )
    else:
        console.say("no DKIM keys")


async def dkimRemove(store: IStore, args: argparse.Namespace, console: Console) -> None:
    if not await store.removeDkimKey(args.domain):
        raise CommandError(f"no DKIM key for {args.domain}")
    console.say(f"DKIM key of {args.domain} removed; its mail is no longer signed")


# -- delivery reports (SPEC §8.4) --


async def accountWebhookSecret(store: IStore, args: argparse.Namespace, console: Console) -> None:
    """Print the account's signing secrets, the current one first (made now if it has
    none). ``--rotate`` makes a new one and keeps the one it replaces, printed after it:
    reports carry both signatures until the next rotation, which drops the older."""
    from mailrelay.delivery.reports import newWebhookSecret

    if await store.getAccount(args.name) is None:
        raise CommandError(f"no such account: {args.name}")
    current = tuple(await store.webhookSecrets(args.name))
    if args.rotate or not current:
        current = (newWebhookSecret(), *current[:1])
        await store.setWebhookSecrets(args.name, current)
    # One secret a line, newest first, so that a script reads the current one on line 1.
    console.say(current[0])
    for previous in current[1:]:
        console.say(f"{previous} (previous: signs reports too until the next --rotate)")


async def reportsList(store: IStore, args: argparse.Namespace, console: Console) -> None:
    """Print each POST of a notification's reports, oldest first: when, the URL's host, the
    answer's code (0: none) and what became of the report."""
    attempts = [
        {
            "report": a.report_id,
            "host": a.host,
            "code": a.code,
            "outcome": a.outcome,
            "at": formatTimestamp(a.at),
        }
        for a in await store.reportAttempts(args.id)
    ]
    if args.json:
        console.printJson(attempts)
    elif attempts:
        console.printTable(
            [("TIME (UTC)", "HOST", "CODE", "OUTCOME", "REPORT")]
            + [(a["at"], a["host"], str(a["code"]), a["outcome"], a["report"]) for a in attempts]
        )
    else:
        console.say(f"no report attempts for {args.id}")


def _reportsCommands(group: Any) -> None:
    listing = _command(group, "list", reportsList, "a notification's report POSTs", listing=True)
    listing.add_argument("id", metavar="NOTIFICATION_ID")


# -- the command line --


class UsageError(CommandError):
    """The command line does not parse (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix(PROG).strip()
        raise UsageError(f"{where + ': ' if where else ''}{message}")


def _command(
    group: Any,
    name: str,
    handler: Handler,
    help: str,
    listing: bool = False,
    createsStore: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand. Only a ``createsStore`` one may run where there is no store yet (see
    :func:`_refuseMissingStore`)."""
    parser: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=handler, prepare=None, createsStore=createsStore)
    if listing:
        parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser


def _accountCommands(group: Any) -> None:
    add = _command(group, "add", accountAdd, "create an enabled account", createsStore=True)
    add.add_argument("name", type=accountName)
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    add.set_defaults(prepare=readPassword)
    password = _command(group, "password", accountPassword, "change an account's password")
    password.add_argument("name")
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin (one line)"
    )
    password.set_defaults(prepare=readPassword)
    _command(group, "list", accountList, "list the accounts", listing=True)
    for name, handler, help in [
        ("show", accountShow, "show an account's settings"),
        ("disable", accountDisable, "refuse the account's logins and messages"),
        ("enable", accountEnable, "enable a disabled account"),
    ]:
        command = _command(group, name, handler, help, listing=name == "show")
        command.add_argument("name")

    change = _command(group, "set", accountSet, "change an account's settings")
    change.add_argument("name")
    change.set_defaults(prepare=collectSettings)
    options: list[tuple[str, str, Any, str]] = [
        ("--sms", "sms_enabled", onOff, "on|off"),
        ("--sms-segments", "sms_segments", smsSegments, "N"),
        ("--sms-credits", "sms_credits", smsCredits, "N|none"),
        ("--rate", "rate_per_second", rate, "N/s|none"),
        ("--daily-quota", "daily_quota", optionalLimit, "N|none"),
        ("--networks", "networks", networks, "CIDR,...|none"),
        ("--require-alternative", "require_alternative", onOff, "on|off"),
        ("--require-rcpt-headers", "require_rcpt_headers", onOff, "on|off"),
        ("--max-message-size", "max_message_size", optionalLimit, "N|none"),
        ("--max-recipients", "max_recipients", optionalLimit, "N|none"),
        ("--bounces", "bounces", onOff, "on|off"),
    ]
    for flag, dest, convert, metavar in options:
        change.add_argument(
            flag, dest=dest, type=convert, metavar=metavar, default=argparse.SUPPRESS
        )
    change.add_argument(
        "--attachments", choices=("allow", "strip", "refuse"), default=argparse.SUPPRESS
    )
    secret = _command(
        group, "webhook-secret", accountWebhookSecret, "print the reports' signing secret"
    )
    secret.add_argument("name")
    secret.add_argument("--rotate", action="store_true", help="make a new secret, keep the old")


def _apikeyCommands(group: Any) -> None:
    create = _command(group, "create", apikeyCreate, "make an API key and print it (once)")
    create.add_argument("name")
    _command(group, "list", apikeyList, "list an account's API keys", listing=True).add_argument(
        "name"
    )
    revoke = _command(group, "revoke", apikeyRevoke, "revoke an API key")
    revoke.add_argument("name")
    revoke.add_argument("keyid")


def _senderCommands(group: Any) -> None:
    add = _command(group, "add", senderAdd, "register a domain, address or SMS sender id")
    add.add_argument("name")
    add.add_argument("sender", type=senderValue, metavar="DOMAIN|ADDRESS|SMS-SENDER-ID")
    _command(group, "list", senderList, "list an account's senders", listing=True).add_argument(
        "name"
    )
    remove = _command(group, "remove", senderRemove, "unregister a sender")
    remove.add_argument("name")
    remove.add_argument("sender")


def _queueCommands(group: Any) -> None:
    _command(group, "stats", queueStats, "count queued messages", listing=True)
    listing = _command(group, "list", queueList, "list the queue's entries", listing=True)
    listing.add_argument("--state", choices=get_args(QueueState))
    listing.add_argument("--account", metavar="NAME")
    listing.add_argument("--limit", type=positiveInt, default=100, metavar="N")
    show = _command(group, "show", queueShow, "an entry and its status trail", listing=True)
    show.add_argument("id", metavar="ID")
    delete = _command(
        group, "delete", queueDelete, "fail an entry's pending recipients and drop it"
    )
    delete.add_argument("id", metavar="ID")
    for name, handler, help, flags in [
        ("retry", queueRetry, "make deferred entries due now", ("--all",)),
        ("hold", queueHold, "keep entries from delivery until released", ("--account",)),
        ("release", queueRelease, "let held entries go, due now", ("--account", "--all")),
    ]:
        command = _command(group, name, handler, help)
        which = command.add_mutually_exclusive_group(required=True)
        which.add_argument("id", nargs="?", metavar="ID")
        if "--account" in flags:
            which.add_argument("--account", metavar="NAME")
        else:
            command.set_defaults(account=None)
        if "--all" in flags:
            which.add_argument("--all", action="store_true")


def _dkimCommands(group: Any) -> None:
    generate = _command(
        group,
        "generate",
        dkimGenerate,
        "make a domain's signing key; print its DNS record",
        createsStore=True,
    )
    generate.add_argument("domain", type=signingDomain, metavar="DOMAIN")
    generate.add_argument("--selector", metavar="S", help="default: mr and the year and month")
    generate.add_argument("--algorithm", choices=get_args(DkimAlgorithm), default="rsa")
    generate.add_argument("--force", action="store_true", help="replace an existing key")
    _command(group, "list", dkimList, "list the DKIM keys", listing=True)
    remove = _command(group, "remove", dkimRemove, "stop signing a domain's mail")
    remove.add_argument("domain", type=signingDomain, metavar="DOMAIN")


def buildParser() -> argparse.ArgumentParser:
    """The whole ``mailrelay`` command line."""
    parser = _Parser(prog=PROG, description="Administer a mailrelay instance.")
    parser.add_argument("--config", metavar="FILE", help="configuration file (mailrelay.toml)")
    topics = parser.add_subparsers(dest="topic", required=True, metavar="COMMAND")
    for name, help, addCommands in [
        ("account", "customer accounts", _accountCommands),
        ("apikey", "API keys of an account", _apikeyCommands),
        ("sender", "senders registered to an account", _senderCommands),
        ("queue", "the delivery queue", _queueCommands),
        ("dkim", "DKIM signing keys of sender domains", _dkimCommands),
        ("reports", "delivery and tracking reports", _reportsCommands),
    ]:
        topic = topics.add_parser(name, help=help, description=help)
        addCommands(topic.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    command = _command(topics, "status", status, "a notification's status trail", listing=True)
    command.add_argument("id", metavar="NOTIFICATION_ID")
    return parser


async def execute(reactor: Any, argv: Sequence[str], console: Console | None = None) -> int:
    """
    Run one command line (without the program name) against the configured store, on a
    running reactor. Returns the exit status; a failure has printed its one line on stderr.
    """
    console = console or Console()
    try:
        args = buildParser().parse_args(argv)
        config, configText = loadConfigSource(args.config)
        if args.prepare is not None:
            args.prepare(args, console)
        if config.store.backend == "sqlite":
            _refuseRootInOthersDataDir(config.dataPath)
            if not args.createsStore:
                _refuseMissingStore(config, args.config, configText is not None)
        store = makeStore(config, reactor)
        await store.open()
        try:
            await args.handler(store, args, console)
        finally:
            await store.close()
    except UsageError as e:
        console.fail(str(e))
        return EXIT_USAGE
    except (CommandError, ConfigError, StoreError) as e:
        console.fail(str(e))
        return EXIT_FAILURE
    except (KeyboardInterrupt, EOFError):
        console.fail("interrupted")
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`mailrelay dkim generate D | head -2`): nothing to say to it.
        # Standard output is pointed at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as e:  # one line for the operator, whatever went wrong
        console.fail(f"internal error: {e!r}")
        return EXIT_FAILURE
    return 0


def _refuseMissingStore(config: Config, configPath: str | None, configRead: bool) -> None:
    """
    Run from a directory other than the relay's, the command would find neither its config
    nor its data_dir, and opening the store would make an empty one there: listing it says
    "no accounts", and the operator is left wondering why logins fail. Only the commands that
    create something (``account add``, ``dkim generate``) may make a store; the others say
    which config and data_dir they used instead.
    """
    path = sqlitePath(config)
    if path.exists():
        return
    if configRead:
        used = f"config {Path(configPath or DEFAULT_CONFIG_FILE).resolve()}"
    else:
        used = f"no config file (no {DEFAULT_CONFIG_FILE} in {Path.cwd()}): the defaults"
    raise CommandError(
        f"no store at {path.resolve()} ({used}, data_dir {config.data_dir!r}); "
        "give the relay's config with --config, or run from its directory "
        "('account add' makes a new store)"
    )


def _refuseRootInOthersDataDir(dataPath: Path) -> None:
    """Run as root against a data_dir another user owns (the relay's), the command would make
    root-owned files there that the relay cannot write (or, with a loose umask, that others
    can read): it must run as that user instead."""
    try:
        owner = dataPath.stat().st_uid
    except OSError:
        return  # nothing there yet: the store makes it
    if os.geteuid() == 0 and owner != 0:
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise CommandError(
            f"data_dir {dataPath} belongs to {name}; run this as that user "
            f"(sudo -u {name} mailrelay ...), not as root"
        )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script's entry point: ``execute`` the command line, exit with its status."""
    arguments = sys.argv[1:] if argv is None else argv
    keepFilesPrivate()

    async def run(reactor: Any) -> None:
        raise SystemExit(await execute(reactor, arguments))

    task.react(run)


if __name__ == "__main__":
    main()
