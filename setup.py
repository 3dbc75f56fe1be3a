"""
Only the optional C extension lives here; everything else is in setup.cfg.

``_mailrelay_scan`` speeds up the DATA reader. It is optional: without a C compiler the
install still succeeds and mailrelay uses the pure-Python scans (``mailrelay.smtp.data``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("_mailrelay_scan", ["mailrelay/smtp/_scan.c"], optional=True),
    ],
)
