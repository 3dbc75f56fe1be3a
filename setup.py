"""
Only the optional C extension lives here; everything else is in setup.cfg.

``_mailrelay_scan`` speeds up the DATA reader, ``_mailrelay_segments`` the SQLite store's body
writes. Both are optional: without a C compiler the install still succeeds and mailrelay uses
the pure-Python scans (``mailrelay.smtp.data``) and google-crc32c
(``mailrelay.store.sqlite.bodies``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("_mailrelay_scan", ["mailrelay/smtp/_scan.c"], optional=True),
        Extension("_mailrelay_segments", ["mailrelay/store/sqlite/_segments.c"], optional=True),
    ],
)
