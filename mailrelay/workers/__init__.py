"""
Several relay processes for one relay (``workers = N``), so SMTP sessions use every core, and
the web process, which answers the web endpoint apart from them.

The main process (``twistd mailrelay``) binds the listening sockets, serves on them itself and
runs the web resource; :class:`~mailrelay.workers.pool.WorkerPool` starts ``N - 1`` more
processes (:mod:`mailrelay.workers.child`) that take over the same listening sockets; new
connections go to the least busy process (:mod:`mailrelay.workers.balance`). With ``[web]
process`` deciding so, it also starts :mod:`mailrelay.workers.web`, which takes the web
endpoint's socket over. Every process
has its own store connection: with SQLite each worker writes the messages it accepts to a file
of its own beside the main one (:mod:`mailrelay.store.sqlite.files`), each process makes
notification ids with its own instance number, and the limits kept in memory are shared out
(see :func:`mailrelay.core.buildCore`).
"""
