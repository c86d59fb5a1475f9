"""SMART system scopes (SMART App Launch 2, "Scopes for requesting FHIR resources"), for Backend Services clients.

A scope is ``system/<ResourceType or *>.<permissions>``: SMART v2 permissions are ``c r u d s`` in that order
(``system/Questionnaire.rs``), SMART v1 ones ``read`` (= ``rs``), ``write`` (= ``cud``) and ``*`` (= ``cruds``). The
resource type is compared case-insensitively (the DTR text writes ``system/questionnaire.rs``). Anything else
(``patient/...``, ``user/...``, ``launch``, v2 granular scopes with ``?param=``) is not a scope this service grants.
Pure: no Flask, so configuration checks and the token endpoint share it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PERMISSIONS = "cruds"  # the v2 order
V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"system/(\*|[A-Za-z]{1,64})\.(read|write|\*|c?r?u?d?s?)")


@dataclass(frozen=True)
class Scope:
    type: str  # as written; "*" for any type
    perms: frozenset[str]
    text: str  # the scope as written

    @property
    def key(self) -> str:
        return self.type.lower()


def parse(text: str) -> Scope | None:
    """The scope ``text`` names, or None when it is not a SMART system scope."""
    found = _SCOPE.fullmatch(text)
    if found is None or not found.group(2):
        return None
    perms = V1.get(found.group(2), found.group(2))
    return Scope(found.group(1), frozenset(perms), text)


def render(type_: str, perms: Iterable[str]) -> str:
    have = set(perms)
    return f"system/{type_}.{''.join(p for p in PERMISSIONS if p in have)}"


def grant(requested: Iterable[str], allowed: Iterable[Scope]) -> list[str]:
    """What to grant for the ``requested`` scope strings to a client that may have ``allowed``: per requested scope,
    its intersection with the allowed ones. A requested scope granted whole is given back as written (v1 stays v1,
    the client's spelling of the type is kept); a narrowed one is given in v2 form (``system/*.rs`` asked by a client
    allowed ``system/Questionnaire.rs`` gets ``system/Questionnaire.rs``). Unknown scopes are dropped."""
    allowed = list(allowed)
    granted: dict[str, tuple[str, set[str]]] = {}  # type key -> (spelling, permissions)
    whole: dict[tuple[str, frozenset[str]], str] = {}  # a requested scope granted whole, as written
    for text in requested:
        want = parse(text)
        if want is None:
            continue
        pieces: dict[str, tuple[str, set[str]]] = {}
        for may in allowed:
            if want.key != "*" and may.key not in ("*", want.key):
                continue
            both = want.perms & may.perms
            if not both:
                continue
            spelling = want.type if want.key != "*" else may.type
            pieces.setdefault(spelling.lower(), (spelling, set()))[1].update(both)
        for key, (spelling, piece) in pieces.items():
            granted.setdefault(key, (spelling, set()))[1].update(piece)
        if pieces.get(want.key, ("", set()))[1] == want.perms:
            whole.setdefault((want.key, want.perms), text)
    any_type = granted.get("*", ("*", set()))[1]
    out: list[str] = []
    for key, (spelling, perms) in granted.items():
        if key != "*" and perms <= any_type:
            continue  # already granted by system/*.<perms>
        given = whole.get((key, frozenset(perms))) or render(spelling, perms)
        if given not in out:
            out.append(given)
    return out


def covers(granted: Iterable[Scope], needed: Scope) -> bool:
    """Whether the ``granted`` scopes together give every permission of ``needed`` on its resource type (a wildcard
    grant covers every type; ``needed`` with a wildcard type needs wildcard grants)."""
    have: set[str] = set()
    for scope in granted:
        if scope.key in ("*", needed.key):
            have |= scope.perms
    return needed.perms <= have
