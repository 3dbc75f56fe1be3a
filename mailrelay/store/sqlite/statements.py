"""
Statements that cover many rows at once: multi-row inserts, ``IN (...)`` lists, and reads
whose rows come back as one.

SQLite runs a statement in one call that lets go of the GIL once; ``executemany`` makes one
such call per row, and so does each row a ``SELECT`` returns. Each time, the database thread
must win the GIL back from the busy reactor thread, which can take a whole switch interval.
So the threads' work sends many rows in few statements, in chunks of powers of two so that
few distinct statements are prepared (each connection caches the ones it has), and reads
many rows as one (:func:`rowsAtOnce`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any, TypeVar

MOST_ROWS_PER_INSERT = 64
MOST_VALUES_PER_LIST = 256

T = TypeVar("T")


def powerOfTwoChunks(values: Sequence[T], most: int) -> Iterator[Sequence[T]]:
    """``values`` in chunks of at most ``most``, each a power of two long (the largest that
    fits what is left)."""
    start = 0
    while start < len(values):
        count = min(most, 1 << ((len(values) - start).bit_length() - 1))
        yield values[start : start + count]
        start += count


def inChunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """``values`` in chunks for ``IN (...)`` lists (:func:`withList`)."""
    return powerOfTwoChunks(values, MOST_VALUES_PER_LIST)


LIST = "(?*)"
"""Where :func:`withList` puts an ``IN`` list's placeholders in a statement."""


def withList(statement: str, values: Sequence[Any]) -> str:
    """``statement``, a constant, with its :data:`LIST` made the placeholders of an ``IN``
    list of ``values`` (pass them chunked by :func:`inChunks`): ``IN (?, ?, ?)``."""
    return _withList(statement, len(values))


@lru_cache(maxsize=256)
def _withList(statement: str, count: int) -> str:
    if statement.count(LIST) != 1:
        raise ValueError(f"not one {LIST} in {statement!r}")
    return statement.replace(LIST, "(" + ", ".join("?" * count) + ")")


@lru_cache(maxsize=256)
def _insertStatement(into: str, columns: int, rows: int, suffix: str, orIgnore: bool) -> str:
    row = "(" + ", ".join("?" * columns) + ")"
    verb = "INSERT OR IGNORE" if orIgnore else "INSERT"
    # Only the callers' constant table and column names and placeholders: no values.
    return f"{verb} INTO {into} VALUES {', '.join([row] * rows)}{suffix}"


def insertRows(
    connection: sqlite3.Connection,
    into: str,
    rows: Sequence[tuple[Any, ...]],
    suffix: str = "",
    orIgnore: bool = False,
) -> None:
    """Insert ``rows`` (``into``: ``"table (column, ...)"``) with as few statements as
    possible: a multi-row ``VALUES`` for up to 64 rows at a time; ``orIgnore``: leave out
    those a uniqueness constraint refuses."""
    if not rows:
        return
    columns = len(rows[0])
    for chunk in powerOfTwoChunks(rows, MOST_ROWS_PER_INSERT):
        connection.execute(
            _insertStatement(into, columns, len(chunk), suffix, orIgnore),
            [value for row in chunk for value in row],
        )


def rowsAtOnce(
    connection: sqlite3.Connection, query: str, parameters: Sequence[Any] = ()
) -> list[list[Any]]:
    """The rows of ``query``, a ``SELECT json_group_array(json_array(...))``: the rows as one
    JSON value in one row, so that reading them lets go of the GIL once, not once a row (with
    the reactor thread busy, each time can cost a switch interval). For integers, text and
    NULL: JSON holds no BLOB."""
    (rows,) = connection.execute(query, parameters).fetchone()
    return json.loads(rows)
