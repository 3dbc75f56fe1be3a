"""
Store backends: implementations of :class:`mailrelay.interfaces.IStore`.

:func:`makeStore` picks the backend the configuration names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mailrelay.config import Config, ConfigError
from mailrelay.interfaces import IStore, StoreError

SQLITE_FILE_NAME = "mailrelay.sqlite3"


def sqlitePath(config: Config) -> Path:
    """The main file of the SQLite store of ``config`` (whether or not it exists)."""
    return config.dataPath / SQLITE_FILE_NAME


def makeStore(
    config: Config, reactor: Any, processIndex: int = 0, readsOnly: bool = False
) -> IStore:
    """
    The store the configuration names, not yet opened (call ``open()`` on it), for the relay
    process numbered ``processIndex`` (0: the main one; 1.. the other workers): it makes
    notification ids with instance number ``instance_id + processIndex``.

    SQLite: ``<data_dir>/mailrelay.sqlite3``; ``data_dir`` is created with mode 0700 if missing
    (it holds password hashes and message bodies). Redis: the server of ``redis_url``, keys
    under ``mailrelay:``; ``instance_id = 0`` (the default) means "take a free instance number
    from Redis at open", any other value is used as it is. Raises ConfigError for a backend
    that cannot be used and StoreError when ``data_dir`` cannot be created. A SQLite worker
    writes the notifications it accepts to a file of its own beside the main one,
    ``mailrelay.worker-<processIndex>.sqlite3``, so that no process's intake waits for another's
    commits; every process reads them all, and delivers what it accepted (the main process
    also what workers no longer running accepted). ``readsOnly``: for a process that only
    reads (the web process), SQLite reads on the reactor thread rather than a thread's.
    """
    if config.store.backend == "sqlite":
        from mailrelay.store.sqlite import SQLiteStore, workerFile

        dataDir = config.dataPath
        try:
            dataDir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create data_dir {str(dataDir)!r}: {e.strerror}") from None
        path = sqlitePath(config)
        return SQLiteStore(
            path,
            reactor,
            config.store.instance_id + processIndex,
            home=workerFile(path, processIndex) if processIndex else None,
            deliveringWorkers=config.processCount - 1,
            inlineReads=readsOnly,
        )
    if config.store.backend == "redis":
        from mailrelay.store.redis import RedisStore

        instanceId = config.store.instance_id + processIndex if config.store.instance_id else None
        try:
            return RedisStore(config.store.redis_url, reactor, instanceId=instanceId)
        except ValueError as e:
            raise ConfigError(f"store.redis_url: {e}") from None
    raise ConfigError(f"store.backend: no such backend: {config.store.backend!r}")
