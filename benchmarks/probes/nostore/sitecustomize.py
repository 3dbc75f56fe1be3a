"""
The ``mailrelay-nostore`` benchmark column, a diagnostic and never a way to run the relay: on
this directory's ``PYTHONPATH`` (the benchmark adapter puts it there for that column only), the
SQLite store's ``enqueue`` succeeds at once and keeps nothing. Everything else (SMTP, policy,
notification ids, the reply) runs as usual, so the column shows how fast the intake would be if
storing cost nothing: the ceiling against which the durable store's cost is read.
"""

import sys

from twisted.internet.defer import succeed

from mailrelay.store.sqlite import store

store.SQLiteStore.enqueue = lambda self, notification, message: succeed(None)  # type: ignore[method-assign]
sys.stderr.write("mailrelay-nostore: SQLiteStore.enqueue stores NOTHING (benchmark diagnostic)\n")
