"""
Versioned schema for the SQLite store.

The schema lives in ``schema/NNN_name.sql`` files shipped as package data. A database records the
version it is at in ``PRAGMA user_version``; :func:`upgrade` applies, in order and in one
transaction, every script numbered above that version. ``001_initial.sql`` creates the tables; a
later change is a new file (``002_add_x.sql``) that upgrades version 1 to 2 -- files that shipped
are never edited.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from importlib import resources

from mailrelay.interfaces import StoreError

_SCRIPT_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def schemaScripts() -> list[tuple[int, str]]:
    """All ``(version, sql)`` upgrade scripts, in version order (1, 2, ... without gaps)."""
    folder = resources.files(__package__).joinpath("schema")
    scripts = []
    for entry in folder.iterdir():
        match = _SCRIPT_NAME.match(entry.name)
        if match:
            scripts.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    scripts.sort()
    if [version for version, _ in scripts] != list(range(1, len(scripts) + 1)):
        raise StoreError("sqlite store: schema scripts are missing or misnumbered")
    return scripts


def statements(script: str) -> Iterator[str]:
    """The SQL statements of a script, one at a time (``executescript`` would COMMIT first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    leftover = [
        line for line in pending.splitlines() if line.strip() and not line.strip().startswith("--")
    ]
    if leftover:
        raise StoreError(f"sqlite store: incomplete statement in schema: {leftover[0]!r}")


def upgrade(connection: sqlite3.Connection) -> int:
    """
    Bring the database to the newest schema version; returns that version.

    Runs under ``BEGIN IMMEDIATE``, so two processes opening a new database at once cannot both
    create it. Refuses a database newer than this code knows.
    """
    scripts = schemaScripts()
    latest = scripts[-1][0]
    connection.execute("BEGIN IMMEDIATE")
    try:
        (current,) = connection.execute("PRAGMA user_version").fetchone()
        if current > latest:
            raise StoreError(
                f"sqlite store: database schema version {current} is newer than this "
                f"mailrelay knows ({latest})"
            )
        for version, script in scripts:
            if version > current:
                for statement in statements(script):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {version:d}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return latest
