"""What the property tests (tests/test_properties_*.py) share: the hypothesis settings, JSON strategies, mutations of
valid documents, raw-byte mutations of a body, an app built once per module, and the checks every answer must pass.

The settings are deterministic (``derandomize``, no example database) and bounded (``max_examples`` per test), so a
run is the same on every machine and takes seconds; a failure found once is kept as an explicit ``@example`` or a
plain test beside the property, never in a database.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import BASE, FIXED_NOW, TEST_ISS, ClientKey
from flask import Flask
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from cds import create_app
from cds.errors import CdsError

# hypothesis keeps caches (the Unicode table, constants read from cds/) under ./.hypothesis unless told otherwise,
# and its pytest plugin writes them while collecting, before any fixture runs: keep them out of the working tree
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "cds-payer-hypothesis"))

PROPERTIES = settings(
    derandomize=True,  # the same examples on every run and machine
    database=None,  # nothing written under .hypothesis/; findings are kept as explicit examples
    deadline=None,  # a hook call validates FHIR and evaluates policies: its time varies, and time is not asserted
    # 150 keeps each property to seconds; CDS_PROPERTY_EXAMPLES=5000 hunts further on a workstation
    max_examples=int(os.environ.get("CDS_PROPERTY_EXAMPLES", "150")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)

# an element path as FHIRPath names it: dotted names (CDS Hooks keys like davinci-crd.configuration have hyphens),
# each optionally indexed ([0]); a name that is no identifier is quoted in backticks
_NAME = r"(?:[A-Za-z_$][A-Za-z0-9_\-$]*|`(?:[^`\\\n]|\\.)*`)(?:\[[0-9]+\])*"
ELEMENT_PATH = re.compile(rf"{_NAME}(?:\.{_NAME})*")
MAX_EXPRESSION = 2_000  # a path never quotes a long value back: the deepest legal nesting stays far below

LONG = "x" * 20_000
STRANGE_TEXT = [
    "",
    " ",
    "\x00",
    "\n",
    "\ud800",  # a lone surrogate: valid in JSON text as an escape, not encodable as UTF-8
    "\u202e\u0645\u0631\u062d\u0628\u0627",
    "\U0001f9ec" * 3,
    "é" * 5_000,
    LONG,
    "Patient/",
    "Patient/pat-1/_history/1",
    "#contained",
    "urn:uuid:",
    "http://",
    "0",
    "true",
    "null",
    "{}",
]
STRANGE_NUMBERS: list[Any] = [0, -1, -0.0, 1e308, -1e308, 5e-324, 2**63, -(2**63) - 1, 10**38, 0.1, 1.5]
FHIR_KEYS = [
    "resourceType",
    "id",
    "reference",
    "entry",
    "resource",
    "fullUrl",
    "coding",
    "system",
    "code",
    "value",
    "extension",
    "url",
    "sequence",
    "identifier",
    "valueReference",
    "item",
]
RESOURCE_TYPES = [
    "",
    "Bundle",
    "Claim",
    "Coverage",
    "Patient",
    "Organization",
    "Practitioner",
    "MedicationRequest",
    "ServiceRequest",
    "QuestionnaireResponse",
    "OperationOutcome",
    "Parameters",
    "NotAResource",
]
REFERENCES = [
    "",
    "Patient/nowhere",
    "Organization/",
    "#contained",
    "urn:uuid:missing",
    "http://elsewhere.test/fhir/Patient/pat-1/_history/2",
    "/",
    "Claim/claim-1",
    "Coverage/cov-1",
    "a/b/c/d/e",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(STRANGE_NUMBERS)
    | st.text(max_size=12)
    | st.sampled_from(STRANGE_TEXT)
)
keys = st.sampled_from(FHIR_KEYS) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
# one representative of each JSON type, to replace a value with one of another type
TYPED: list[Any] = [None, True, False, 0, 7, -3.5, "", "text", [], [{}], {}, {"value": "x"}]

Path_ = tuple[str | int, ...]


def paths(doc: Any, here: Path_ = ()) -> list[Path_]:
    """Every node of a JSON document, as the keys and indexes leading to it (the root is ``()``)."""
    out = [here]
    if isinstance(doc, dict):
        for key, value in doc.items():
            out += paths(value, (*here, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += paths(value, (*here, i))
    return out


def _get(doc: Any, path: Path_) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def _put(doc: Any, path: Path_, value: Any) -> Any:
    """The document with the node at ``path`` replaced by ``value`` (the value itself for the root)."""
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def mutated(draw: st.DrawFn, valid: Any, most: int = 3) -> Any:
    """A copy of a valid document with one to ``most`` mutations at nodes drawn from it: a key or entry dropped, a
    value replaced (by any JSON, by another JSON type, by an empty string, list or object, by a very long string, by
    another node of the document), an entry duplicated, a value nested deep (but within the JSON bounds), a
    resourceType changed, a reference pointed at nothing."""
    doc = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, most))):
        where = draw(st.sampled_from(paths(doc)))
        kind = draw(
            st.sampled_from(
                ["drop", "any", "retype", "empty", "duplicate", "long", "nest", "swap", "resourceType", "reference"]
            )
        )
        node = _get(doc, where)
        parent = _get(doc, where[:-1]) if where else None

        if kind == "drop" and where:
            del parent[where[-1]]  # type: ignore[index]
        elif kind == "any":
            doc = _put(doc, where, draw(json_values))
        elif kind == "retype":
            other = draw(st.sampled_from([t for t in TYPED if type(t) is not type(node)]))
            doc = _put(doc, where, copy.deepcopy(other))
        elif kind == "empty":
            doc = _put(doc, where, draw(st.sampled_from(["", [], {}])))
        elif kind == "duplicate":
            if isinstance(parent, list):
                parent.insert(where[-1] + 1, copy.deepcopy(node))  # type: ignore[operator]
            elif isinstance(node, list) and node:
                node.append(copy.deepcopy(node[0]))
        elif kind == "long":
            doc = _put(doc, where, draw(st.sampled_from([LONG, "é" * 5_000, [copy.deepcopy(node)] * 300])))
        elif kind == "nest":
            doc = _put(doc, where, _nest(copy.deepcopy(node), draw(st.integers(1, 60))))
        elif kind == "swap":
            doc = _put(doc, where, copy.deepcopy(_get(doc, draw(st.sampled_from(paths(doc))))))
        elif kind == "resourceType" and isinstance(node, dict):
            node["resourceType"] = draw(st.sampled_from(RESOURCE_TYPES))
        elif kind == "reference" and isinstance(node, dict):
            node["reference"] = draw(st.sampled_from(REFERENCES))
    return doc


def encoded(doc: Any) -> bytes:
    """A document as a client would send it (the lone surrogates a mutation may add are escaped, as JSON allows)."""
    return json.dumps(doc).encode()


@st.composite
def raw_bytes(draw: st.DrawFn, valid: bytes) -> bytes:
    """A body's bytes broken the ways a transport or a careless client breaks them: truncated, a byte sequence that
    is not UTF-8 put in, a BOM in front, another Unicode encoding, bytes replaced, or just any bytes."""
    how = draw(st.sampled_from(["truncate", "invalid-utf8", "bom", "encoding", "flip", "any"]))
    if how == "truncate":
        return valid[: draw(st.integers(0, max(len(valid) - 1, 0)))]
    if how == "invalid-utf8":
        at = draw(st.integers(0, len(valid)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80\x80", b"\xc0\xaf"]))
        return valid[:at] + bad + valid[at:]
    if how == "bom":
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf\xef\xbb\xbf"])) + valid
    if how == "encoding":
        text = valid.decode("utf-8")
        return text.encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"])), "replace")
    if how == "flip":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return draw(st.binary(max_size=200))


def check_client_error(exc: BaseException) -> None:
    """What a refused request must raise: a CdsError with a 4xx status and a message; its expression, when given, a
    FHIRPath-like element path of bounded length."""
    assert isinstance(exc, CdsError), f"{type(exc).__name__}: {exc}"
    assert 400 <= exc.http_status < 500, (exc.http_status, exc.message)
    assert isinstance(exc.message, str) and exc.message.strip()
    if exc.expression is not None:
        assert len(exc.expression) <= MAX_EXPRESSION, exc.expression[:200]
        assert ELEMENT_PATH.fullmatch(exc.expression), exc.expression


def check_answer(resp: Any, unhandled: list[str]) -> None:
    """What every answer must be: below 500, and a 4xx an OperationOutcome (JSON) that says what is wrong."""
    if currently_in_test_context():
        event(f"status {resp.status_code}")  # --hypothesis-show-statistics: how many examples get how far
    assert resp.status_code < 500, (resp.status_code, resp.get_data(as_text=True)[:500], unhandled[-1:])
    if resp.status_code >= 400:
        body = json.loads(resp.get_data())
        assert body["resourceType"] == "OperationOutcome", body
        issue = body["issue"][0]
        assert issue["severity"] == "error" and isinstance(issue["code"], str) and issue["code"]
        assert isinstance(issue["details"]["text"], str) and issue["details"]["text"].strip()
        for expression in issue.get("expression", ()):
            assert len(expression) <= MAX_EXPRESSION and ELEMENT_PATH.fullmatch(expression), expression


class Unhandled(logging.Handler):
    """Collects the app's "unhandled" log lines (exception type and frames), to show why an answer was a 500."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def module_app(directory: Path, client_key: ClientKey, **config: Any) -> Iterator[tuple[Flask, list[str]]]:
    """An app like conftest's ``make_app`` builds (SQLite, fixed clock, authentication off), built once for a
    module so hypothesis runs many examples against it; yields it with the app's unhandled-error log lines."""
    counter = itertools.count(1)
    pa_counter = itertools.count(1)
    settings_ = {
        "data_dir": str(directory / "data"),
        "base_url": BASE,
        "auth_required": False,
        "demo_client": False,
        "clients": [{"iss": TEST_ISS, "jwks": client_key.jwks}],
        "log_level": "WARNING",
        "fhir_servers": [],  # no fhirServer a mutation writes is ever queried
        **config,
    }
    new_id: Callable[[], str] = lambda: f"00000000-0000-4000-8000-{next(counter):012d}"  # noqa: E731
    app = create_app(
        settings_,
        environ={},
        clock=lambda: FIXED_NOW,
        new_id=new_id,
        new_pa_id=lambda: f"PA-PROP{next(pa_counter):05d}",
    )
    handler = Unhandled()
    logging.getLogger("cds").addHandler(handler)
    try:
        yield app, handler.lines
    finally:
        logging.getLogger("cds").removeHandler(handler)
        app.extensions["cds"].store.dispose()
