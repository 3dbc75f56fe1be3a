"""Numbers a client or a URL writes as text."""

from __future__ import annotations


def isDecimal(text: str, maxDigits: int) -> bool:
    """
    Whether ``text`` is 1 to ``maxDigits`` ASCII digits: what may go to ``int()`` from a client.
    ``str.isdigit`` alone takes other scripts' digits, and ``int()`` of thousands of digits
    takes long (and refuses more than 4,300), so every such check bounds the length first.
    """
    return len(text) <= maxDigits and text.isascii() and text.isdigit()
