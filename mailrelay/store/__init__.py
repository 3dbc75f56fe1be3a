"""
Store backends: implementations of :class:`mailrelay.interfaces.IStore`.

:func:`makeStore` picks the backend the configuration names.
"""

from __future__ import annotations

from typing import Any

from mailrelay.config import Config, ConfigError
from mailrelay.interfaces import IStore, StoreError

SQLITE_FILE_NAME = "mailrelay.sqlite3"


def makeStore(config: Config, reactor: Any) -> IStore:
    """
    The store the configuration names, not yet opened (call ``open()`` on it).

    SQLite: ``<data_dir>/mailrelay.sqlite3``; ``data_dir`` is created with mode 0700 if missing
    (it holds password hashes and message bodies). Raises ConfigError for a backend that cannot
    be used and StoreError when ``data_dir`` cannot be created.
    """
    if config.store.backend == "sqlite":
        from mailrelay.store.sqlite import SQLiteStore

        dataDir = config.dataPath
        try:
            dataDir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create data_dir {str(dataDir)!r}: {e.strerror}") from None
        return SQLiteStore(dataDir / SQLITE_FILE_NAME, reactor, config.store.instance_id)
    raise ConfigError(f"store.backend: {config.store.backend} backend not available yet")
