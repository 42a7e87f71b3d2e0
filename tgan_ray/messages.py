"""Messages people read: no Python object reprs with memory addresses in them.

A library error such as Pillow's ``cannot identify image file <_io.BytesIO object at 0x7f3a...>`` names an
in-memory buffer, not the user's file, and its address changes on every run. The message around it already
names the file, so the repr is dropped.
"""

from __future__ import annotations

import re

# <_io.BytesIO object at 0x7f..>, <function f at 0x..>, <built-in method x of y object at 0x..>
_ADDRESS_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>:?")


def without_addresses(text: object) -> str:
    """``text`` without ``<... at 0x...>`` object reprs."""
    return _ADDRESS_REPR.sub("", str(text))


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), without object reprs, cut to ``limit`` characters."""
    flat = " ".join(without_addresses(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
