"""JSON from outside, parsed with bounds: every body a client (or an EHR) sends goes through :func:`loads`.

``json.loads`` alone fails badly on hostile input: 10,000 nested brackets raise ``RecursionError`` (the C scanner
recurses once per level), an integer of 5,000 digits raises ``ValueError`` (Python's int digit limit, 4,300), and
``NaN``, ``Infinity`` and ``1e999`` are accepted although JSON has no such numbers (and ``json.dumps`` would write
them back out as invalid JSON). :func:`loads` checks the raw bytes first, in one linear pass that ignores what is
inside strings, and answers :class:`MalformedJson` (400 structure) naming the problem.

Limits (generous for FHIR):

``MAX_DEPTH = 100``
    arrays and objects nested inside each other. A FHIR Bundle of resources with contained resources and nested
    extensions stays under 20; the C scanner and later processing stay far from Python's recursion limit.
``MAX_NUMBER_CHARS = 40``
    characters in one number token (sign, digits, point, exponent). FHIR ``integer64`` has 19 digits and
    ``decimal`` is at most 18 significant digits in practice; 40 leaves room for any sensible representation.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from cds.errors import MalformedJson

MAX_DEPTH = 100
MAX_NUMBER_CHARS = 40

_NOT_QUOTES_OR_BRACKETS = bytes(b for b in range(256) if b not in b'"[]{}')
_STEP = [0] * 256
for _open, _close in (b"[]", b"{}"):
    _STEP[_open], _STEP[_close] = 1, -1
_NUMBER_MASK = bytes(ord("1") if b in b"-+.0123456789eE" else ord("0") for b in range(256))
_LONG_RUN = b"1" * (MAX_NUMBER_CHARS + 1)
_LONG_NUMBER = re.compile(rb"[-+.0-9eE]{%d,}" % (MAX_NUMBER_CHARS + 1))


class _NotFinite(ValueError):
    """Raised from inside json.loads for NaN, Infinity, -Infinity and numbers that overflow to infinity."""


def loads(body: bytes, *, source: str = "The request body") -> Any:
    """Parse ``body`` (UTF-8, or UTF-16/32 as json.loads detects) within the limits above.

    ``source`` names the body in error messages (e.g. "The EHR's response").

    :raise MalformedJson: not text, not JSON, too deep, a number too long, or a non-finite number.
    """
    try:
        encoding = json.detect_encoding(body)
        text = body.decode(encoding, "surrogatepass")
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"{source} is not valid JSON (UnicodeDecodeError: {exc})") from None
    _check_bounds(body if encoding.startswith("utf-8") else text.encode("utf-8", "surrogatepass"), source)
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except _NotFinite as exc:
        raise MalformedJson(f"{source} holds the number {exc}; JSON numbers are finite") from None
    except json.JSONDecodeError as exc:
        raise MalformedJson(f"{source} is not valid JSON (JSONDecodeError: {exc})") from None


def _check_bounds(utf8: bytes, source: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH and number tokens longer than MAX_NUMBER_CHARS, outside strings.

    Linear in the body, in C-speed passes (no Python loop per byte). Escaped backslashes, then escaped quotes, are
    removed first, so every quote left opens or closes a string. On malformed JSON the figures may differ from what
    json.loads would meet, but only after the point where json.loads stops with its own error."""
    plain = utf8.replace(b"\\\\", b"").replace(b'\\"', b"")
    depth = _depth(plain)
    if depth > MAX_DEPTH:
        raise MalformedJson(f"{source} nests arrays and objects {depth} deep; at most {MAX_DEPTH} levels are accepted")
    longest = _long_number(plain)
    if longest:
        raise MalformedJson(f"{source} holds a number of {longest} characters; at most {MAX_NUMBER_CHARS} are accepted")


def _depth(plain: bytes) -> int:
    """The deepest nesting of brackets outside strings: the running count of opening minus closing brackets."""
    kept = plain.translate(None, _NOT_QUOTES_OR_BRACKETS)
    # a string holding no bracket is now an adjacent "" pair, and removing the pairs left to right meets them in
    # order; a quote left over means some string holds a bracket (or never ends), and the strings are cut properly
    brackets = kept.replace(b'""', b"")
    if b'"' in brackets:
        brackets = _outside_strings(kept)
    return max(accumulate(map(_STEP.__getitem__, brackets), initial=0))


def _long_number(plain: bytes) -> int:
    """The length of the first number token over MAX_NUMBER_CHARS outside strings, or 0."""
    if _LONG_RUN not in plain.translate(_NUMBER_MASK):  # no long run anywhere, strings included: the usual case
        return 0
    found = _LONG_NUMBER.search(_outside_strings(plain))
    return len(found.group()) if found else 0


def _outside_strings(plain: bytes) -> bytes:
    """``plain`` with the content of every string cut out (an unterminated one runs to the end)."""
    return b'""'.join(plain.split(b'"')[::2])


def _reject_constant(name: str) -> Any:
    raise _NotFinite(name)


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise _NotFinite(token)
    return value
