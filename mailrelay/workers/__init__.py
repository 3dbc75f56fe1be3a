"""
Several intake processes for one relay (``workers = N``), so SMTP sessions use every core.

The main process (``twistd mailrelay``) binds the listening sockets, serves on them itself and
runs the web resource; :class:`~mailrelay.workers.pool.WorkerPool` starts ``N - 1`` more
processes (:mod:`mailrelay.workers.child`) that take over the same listening sockets; new
connections go to the least busy process (:mod:`mailrelay.workers.balance`). Every process
has its own store connection: with SQLite each worker writes the messages it accepts to a file
of its own beside the main one (:mod:`mailrelay.store.sqlite.files`), each process makes
notification ids with its own instance number, and the limits kept in memory are shared out
(see :func:`mailrelay.core.buildCore`).
"""
