"""
The SQLite store's account data, all in the main file: accounts (and their SMS credits), API
keys, senders, DKIM keys, webhook secrets and the keys every process shares.

Accounts, API keys, senders, DKIM keys and webhook secrets are read on every login and every
new session, and change rarely: lookups of them go through the
:class:`~mailrelay.store.cache.AccountCache`, and every write of them through
``_changeAccountData``, which clears it.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred

from mailrelay.interfaces import AlreadyExists, InsufficientCredits, NotFound
from mailrelay.model import Account, ApiKey, DkimKey, Sender
from mailrelay.store.cache import AccountCache
from mailrelay.store.common import fromMillis, toMillis
from mailrelay.store.sqlite.files import StoreFiles
from mailrelay.store.sqlite.threads import Work


class AccountData:
    """The :class:`~mailrelay.interfaces.IStore` methods of account data, part of
    :class:`~mailrelay.store.sqlite.store.SQLiteStore`: over its ``_files``, lookups
    remembered in its ``_accountCache``."""

    _files: StoreFiles
    _accountCache: AccountCache

    def _remembered(self, key: tuple[str, str], work: Work) -> Deferred[Any]:
        """``work``'s result on the reader thread, or what it gave less than a moment ago."""
        return self._accountCache.lookup(key, partial(self._files.reader.submit, work))

    def _changeAccountData(self, work: Work) -> Deferred[Any]:
        """Run a write on the main file that changes account data; forget what was
        remembered."""
        return self._accountCache.change(partial(self._files.writer.submit, work, self._files.path))

    # -- accounts, API keys, senders --

    def addAccount(self, name: str, passwordHash: str) -> Deferred[Account]:
        return self._changeAccountData(partial(_addAccount, name=name, passwordHash=passwordHash))

    def getAccount(self, name: str) -> Deferred[Account | None]:
        return self._remembered(("account", name), partial(_getAccount, name=name))

    def listAccounts(self) -> Deferred[list[Account]]:
        return self._files.reader.submit(_listAccounts)

    def updateAccount(self, account: Account) -> Deferred[None]:
        return self._changeAccountData(partial(_updateAccount, account=account))

    def addApiKey(self, account: str, keyId: str, keyHash: str) -> Deferred[ApiKey]:
        createdAt = self._files.now()
        return self._changeAccountData(
            partial(_addApiKey, account=account, keyId=keyId, keyHash=keyHash, createdAt=createdAt)
        )

    def findApiKey(self, keyHash: str) -> Deferred[ApiKey | None]:
        return self._remembered(("apikey", keyHash), partial(_findApiKey, keyHash=keyHash))

    def listApiKeys(self, account: str) -> Deferred[list[ApiKey]]:
        return self._files.reader.submit(partial(_listApiKeys, account=account))

    def revokeApiKey(self, account: str, keyId: str) -> Deferred[bool]:
        return self._changeAccountData(partial(_revokeApiKey, account=account, keyId=keyId))

    def addSender(self, sender: Sender) -> Deferred[None]:
        return self._changeAccountData(partial(_addSender, sender=sender))

    def listSenders(self, account: str) -> Deferred[list[Sender]]:
        return self._remembered(
            ("senders", account), partial(_listSenders, account=account)
        ).addCallback(list)

    def removeSender(self, account: str, value: str) -> Deferred[bool]:
        return self._changeAccountData(partial(_removeSender, account=account, value=value))

    # -- DKIM keys --

    def putDkimKey(self, key: DkimKey) -> Deferred[None]:
        return self._changeAccountData(partial(_putDkimKey, key=key))

    def getDkimKey(self, domain: str) -> Deferred[DkimKey | None]:
        return self._remembered(("dkim", domain), partial(_getDkimKey, domain=domain))

    def listDkimKeys(self) -> Deferred[list[DkimKey]]:
        return self._files.reader.submit(_listDkimKeys)

    def removeDkimKey(self, domain: str) -> Deferred[bool]:
        return self._changeAccountData(partial(_removeDkimKey, domain=domain))

    # -- webhook secrets, shared keys --

    def webhookSecrets(self, account: str) -> Deferred[tuple[str, ...]]:
        return self._remembered(("webhook", account), partial(_webhookSecrets, account=account))

    def setWebhookSecrets(self, account: str, secrets: Sequence[str]) -> Deferred[None]:
        work = partial(_setWebhookSecrets, account=account, secrets=secrets)
        return self._changeAccountData(work)

    def sharedKey(self, name: str, candidate: bytes) -> Deferred[bytes]:
        return self._files.writer.submit(
            partial(_sharedKey, name=name, candidate=candidate), self._files.path
        )


# The work functions below run on a database thread, inside a transaction the thread manages
# (writes) or in autocommit mode (reads).

_ACCOUNT_FIELDS = tuple(f.name for f in dataclasses.fields(Account))
"""The accounts table's columns, named as the Account fields, in the order of _accountRow."""
_ACCOUNT_COLUMNS = ", ".join(_ACCOUNT_FIELDS)


def _accountFromRow(row: Sequence[Any]) -> Account:
    return Account(
        name=row[0],
        password_hash=row[1],
        enabled=bool(row[2]),
        sms_enabled=bool(row[3]),
        sms_segments=row[4],
        rate_per_second=row[5],
        daily_quota=row[6],
        networks=tuple(json.loads(row[7])),
        require_alternative=bool(row[8]),
        require_rcpt_headers=bool(row[9]),
        attachments=row[10],
        max_message_size=row[11],
        max_recipients=row[12],
        bounces=bool(row[13]),
        sms_credits=row[14],
    )


def _accountRow(account: Account) -> tuple[Any, ...]:
    return (
        account.name,
        account.password_hash,
        int(account.enabled),
        int(account.sms_enabled),
        account.sms_segments,
        account.rate_per_second,
        account.daily_quota,
        json.dumps(list(account.networks)),
        int(account.require_alternative),
        int(account.require_rcpt_headers),
        account.attachments,
        account.max_message_size,
        account.max_recipients,
        int(account.bounces),
        account.sms_credits,
    )


def _requireAccount(connection: sqlite3.Connection, name: str) -> None:
    if connection.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone() is None:
        raise NotFound(f"no such account: {name}")


def _addAccount(connection: sqlite3.Connection, name: str, passwordHash: str) -> Account:
    account = Account(name=name, password_hash=passwordHash)
    try:
        connection.execute(
            f"INSERT INTO accounts ({_ACCOUNT_COLUMNS}) "  # noqa: S608
            f"VALUES ({', '.join('?' * len(_ACCOUNT_FIELDS))})",
            _accountRow(account),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"account exists already: {name}") from None
    return account


def _getAccount(connection: sqlite3.Connection, name: str) -> Account | None:
    row = connection.execute(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE name = ?",  # noqa: S608
        (name,),
    ).fetchone()
    return None if row is None else _accountFromRow(row)


def _listAccounts(connection: sqlite3.Connection) -> list[Account]:
    rows = connection.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY name")  # noqa: S608
    return [_accountFromRow(row) for row in rows]


def _updateAccount(connection: sqlite3.Connection, account: Account) -> None:
    assignments = ", ".join(f"{column} = ?" for column in _ACCOUNT_FIELDS[1:])
    row = _accountRow(account)
    cursor = connection.execute(
        f"UPDATE accounts SET {assignments} WHERE name = ?",  # noqa: S608
        (*row[1:], row[0]),
    )
    if cursor.rowcount == 0:
        raise NotFound(f"no such account: {account.name}")


def takeCredits(connection: sqlite3.Connection, account: str, credits: int) -> None:
    """Take ``credits`` SMS credits (give them back if negative) from an account that has a
    prepaid limit and that many; InsufficientCredits otherwise. One statement: two writers
    cannot both take the last ones."""
    cursor = connection.execute(
        "UPDATE accounts SET sms_credits = sms_credits - ? "
        "WHERE name = ? AND (sms_credits IS NULL OR sms_credits >= ?)",
        (credits, account, credits),
    )
    if cursor.rowcount == 0:
        raise InsufficientCredits("the account's SMS credits do not cover the message")


def _apiKeyFromRow(row: Sequence[Any]) -> ApiKey:
    return ApiKey(key_id=row[0], account=row[1], created_at=fromMillis(row[2]))


def _addApiKey(
    connection: sqlite3.Connection, account: str, keyId: str, keyHash: str, createdAt: int
) -> ApiKey:
    _requireAccount(connection, account)
    try:
        connection.execute(
            "INSERT INTO api_keys (key_id, account, key_hash, created_at) VALUES (?, ?, ?, ?)",
            (keyId, account, keyHash, createdAt),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"API key exists already: {keyId}") from None
    return ApiKey(key_id=keyId, account=account, created_at=fromMillis(createdAt))


def _findApiKey(connection: sqlite3.Connection, keyHash: str) -> ApiKey | None:
    row = connection.execute(
        "SELECT key_id, account, created_at FROM api_keys WHERE key_hash = ? AND revoked = 0",
        (keyHash,),
    ).fetchone()
    return None if row is None else _apiKeyFromRow(row)


def _listApiKeys(connection: sqlite3.Connection, account: str) -> list[ApiKey]:
    rows = connection.execute(
        "SELECT key_id, account, created_at FROM api_keys WHERE account = ? AND revoked = 0 "
        "ORDER BY created_at, rowid",
        (account,),
    )
    return [_apiKeyFromRow(row) for row in rows]


def _revokeApiKey(connection: sqlite3.Connection, account: str, keyId: str) -> bool:
    cursor = connection.execute(
        "UPDATE api_keys SET revoked = 1 WHERE account = ? AND key_id = ? AND revoked = 0",
        (account, keyId),
    )
    return cursor.rowcount > 0


def _addSender(connection: sqlite3.Connection, sender: Sender) -> None:
    _requireAccount(connection, sender.account)
    try:
        connection.execute(
            "INSERT INTO senders (account, value, kind) VALUES (?, ?, ?)",
            (sender.account, sender.value, sender.kind),
        )
    except sqlite3.IntegrityError:
        raise AlreadyExists(f"sender exists already: {sender.value}") from None


def _listSenders(connection: sqlite3.Connection, account: str) -> list[Sender]:
    rows = connection.execute(
        "SELECT account, value, kind FROM senders WHERE account = ? ORDER BY value", (account,)
    )
    return [Sender(account=row[0], value=row[1], kind=row[2]) for row in rows]


def _removeSender(connection: sqlite3.Connection, account: str, value: str) -> bool:
    cursor = connection.execute(
        "DELETE FROM senders WHERE account = ? AND value = ?", (account, value)
    )
    return cursor.rowcount > 0


def _dkimKeyFromRow(row: Sequence[Any]) -> DkimKey:
    return DkimKey(
        domain=row[0],
        selector=row[1],
        algorithm=row[2],
        private_key=bytes(row[3]),
        created_at=fromMillis(row[4]),
    )


_DKIM_COLUMNS = "domain, selector, algorithm, private_key, created_at"


def _putDkimKey(connection: sqlite3.Connection, key: DkimKey) -> None:
    connection.execute(
        f"INSERT OR REPLACE INTO dkim_keys ({_DKIM_COLUMNS}) VALUES (?, ?, ?, ?, ?)",  # noqa: S608
        (key.domain, key.selector, key.algorithm, bytes(key.private_key), toMillis(key.created_at)),
    )


def _getDkimKey(connection: sqlite3.Connection, domain: str) -> DkimKey | None:
    row = connection.execute(
        f"SELECT {_DKIM_COLUMNS} FROM dkim_keys WHERE domain = ?",  # noqa: S608
        (domain,),
    ).fetchone()
    return None if row is None else _dkimKeyFromRow(row)


def _listDkimKeys(connection: sqlite3.Connection) -> list[DkimKey]:
    rows = connection.execute(f"SELECT {_DKIM_COLUMNS} FROM dkim_keys ORDER BY domain")  # noqa: S608
    return [_dkimKeyFromRow(row) for row in rows]


def _removeDkimKey(connection: sqlite3.Connection, domain: str) -> bool:
    return connection.execute("DELETE FROM dkim_keys WHERE domain = ?", (domain,)).rowcount > 0


def _webhookSecrets(connection: sqlite3.Connection, account: str) -> tuple[str, ...]:
    row = connection.execute(
        "SELECT secrets FROM webhook_secrets WHERE account = ?", (account,)
    ).fetchone()
    return () if row is None else tuple(json.loads(row[0]))


def _setWebhookSecrets(
    connection: sqlite3.Connection, account: str, secrets: Sequence[str]
) -> None:
    _requireAccount(connection, account)
    connection.execute(
        "INSERT OR REPLACE INTO webhook_secrets (account, secrets) VALUES (?, ?)",
        (account, json.dumps(list(secrets))),
    )


def _sharedKey(connection: sqlite3.Connection, name: str, candidate: bytes) -> bytes:
    """The key kept under ``name``, ``candidate`` if there was none."""
    connection.execute(
        "INSERT OR IGNORE INTO shared_keys (name, value) VALUES (?, ?)", (name, candidate)
    )
    (value,) = connection.execute(
        "SELECT value FROM shared_keys WHERE name = ?", (name,)
    ).fetchone()
    return bytes(value)
