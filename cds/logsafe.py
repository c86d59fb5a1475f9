"""Client-supplied text, made safe for a log line: every value a client chose passes through :func:`clean`.

A raw value could forge log lines (a newline followed by a fake record), hide or reorder text on a terminal
(escape sequences, bidirectional overrides), or turn one log line into a megabyte. :func:`clean` keeps the first
``limit`` characters, escapes control, format and separator characters and the backslash (so an escape in the log
cannot be confused with the text it stands for) and marks what it cut.
"""

from __future__ import annotations

import unicodedata

LIMIT = 64


def clean(value: object, limit: int = LIMIT) -> str:
    """``value`` as one bounded, printable line: at most ``limit`` characters of it, escaped, plus a cut marker."""
    text = value if isinstance(value, str) else str(value)
    shown = "".join(_escape(ch) for ch in text[:limit])
    if len(text) > limit:
        shown += f"...[{len(text) - limit} more chars]"
    return shown


def _escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch != " " and unicodedata.category(ch)[0] in "CZ":  # Cc Cf Cs Co Cn, and Zl Zp Zs other than the space
        return ch.encode("unicode_escape").decode("ascii")
    return ch
