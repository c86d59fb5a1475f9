"""Property tests of the PAS Bundle checker (issue 10 item 2): whatever Bundle a submitter sends to ``Claim/$submit``
or ``Claim/$inquire``, the answer is a ClaimResponse Bundle, Parameters, or a 4xx OperationOutcome naming the
element; never an exception of another kind or a 5xx.

Two levels: the pure functions (:func:`cds.pas.bundle.check` and what the service reads from a checked Bundle: member
id, provider, sender, priority, the items' decisions) on arbitrary JSON and on mutations of valid requests; and the
app, where the same bodies (bare or in Parameters) and broken raw bytes are posted to both operations. The valid
requests (a satisfied CRD order, one DTR answered, one without an assertion, an update, the Inferno example) stay
accepted.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from builders import condition, hook_request, med_order
from conftest import ClientKey
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    PROPERTIES,
    check_answer,
    check_client_error,
    encoded,
    json_values,
    module_app,
    mutated,
    raw_bytes,
)
from test_dtr import completed, d68_2_order, draft_of
from test_pas import EXAMPLES, FHIR, INFERNO_PAYER, INFERNO_REQUEST, info_of, pas_bundle, pas_item, signed_order

from cds.config import DEFAULT_PAYERS
from cds.errors import CdsError
from cds.pas import bundle, decide
from cds.pas.bundle import Checked
from cds.runtime import Runtime

OPERATIONS = ("/fhir/Claim/$submit", "/fhir/Claim/$inquire")
Served = tuple[FlaskClient, Runtime, list[str], list[dict[str, Any]]]

# a failing example that holds a 20,000-character string is reported in full: hypothesis warns, and the suite turns
# warnings into errors, which would hide the failure itself
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning")


def parameters(body: Any) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": body}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[Served]:
    """The app (the shipped payers and Inferno's), and valid PAS requests made against it: a CRD order the record
    satisfies, one DTR answered, an order without an assertion, an update of a submitted request, the Inferno
    example. The first request is submitted, so the update updates a current request."""
    payers = [*DEFAULT_PAYERS, INFERNO_PAYER]
    for app, unhandled in module_app(tmp_path_factory.mktemp("pas"), client_key, payers=payers):
        client = app.test_client()
        satisfied = signed_order(client, hook_request([med_order()], conditions=[condition("D68.311")]))
        asked = signed_order(client, d68_2_order())
        qr = completed(draft_of(client, {"coverage-assertion-id": [info_of(asked)["coverage-assertion-id"]]}))
        qr["id"] = "qr-1"
        first = pas_bundle(satisfied, ident="TX-FIRST", claim_id="claim-first")
        assert client.post(OPERATIONS[0], data=json.dumps(first), content_type=FHIR).status_code == 200
        update = pas_bundle(
            satisfied,
            ident="TX-UPDATE",
            claim_id="claim-update",
            prior=first["entry"][0]["resource"],
            items=[pas_item(1), pas_item(2, "MedicationRequest/mr-2")],
        )
        update["entry"].append(
            {"fullUrl": "http://ehr.test/fhir/MedicationRequest/mr-2", "resource": med_order(oid="mr-2")}
        )
        valid = [
            pas_bundle(satisfied, ident="TX-SATISFIED"),
            pas_bundle(asked, ident="TX-ANSWERED", qr=qr),
            pas_bundle(med_order(status="active"), ident="TX-PLAIN"),
            update,
            json.loads((EXAMPLES / INFERNO_REQUEST).read_text()),
        ]
        yield client, app.extensions["cds"], unhandled, valid


_sent = itertools.count(1)


def fresh(body: Any) -> Any:
    """The body with a Bundle.identifier not sent before (when it still has one), so a mutated request is checked
    and decided rather than answered from the stored response to an earlier one."""
    target = body
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        parts = body.get("parameter")
        target = parts[0].get("resource") if isinstance(parts, list) and parts and isinstance(parts[0], dict) else None
    ident = target.get("identifier") if isinstance(target, dict) else None
    if isinstance(ident, dict) and isinstance(ident.get("value"), str) and ident["value"].startswith("TX-"):
        ident["value"] = f"{ident['value']}-{next(_sent)}"
    return body


def read_bundle(rt: Runtime, body: Any, inquiry: bool) -> None:
    """The checker, then everything the service reads from a checked Bundle before storing it, guarded as the PAS
    edge guards it (an element that is not R4 is named once reading it fails)."""
    with bundle.read_as_r4(body):
        checked: Checked = bundle.check(rt, body, inquiry=inquiry)
        assert checked.bundle_key and checked.claim_key
        bundle.member_id(checked)
        bundle.provider_key(checked)
        bundle.org_identifier(checked)
        bundle.expedited(checked.claim)
        if not inquiry:
            decide.item_states(rt, checked)


def refused_cleanly(rt: Runtime, body: Any, inquiry: bool) -> None:
    try:
        read_bundle(rt, body, inquiry)
    except CdsError as exc:
        check_client_error(exc)


# --- 1. the pure functions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(5), ids=["satisfied", "answered", "plain", "update", "inferno"])
def test_valid_requests_are_accepted(served: Served, n: int) -> None:
    _, rt, _, valid = served
    read_bundle(rt, copy.deepcopy(valid[n]), inquiry=False)
    read_bundle(rt, copy.deepcopy(valid[n]), inquiry=True)


@PROPERTIES
@given(value=json_values, inquiry=st.booleans())
def test_any_json_is_a_checked_bundle_or_a_client_error(served: Served, value: Any, inquiry: bool) -> None:
    refused_cleanly(served[1], value, inquiry)


@PROPERTIES
@given(data=st.data(), inquiry=st.booleans())
def test_a_mutated_bundle_is_a_checked_bundle_or_a_client_error(
    served: Served, data: st.DataObject, inquiry: bool
) -> None:
    body = data.draw(st.sampled_from(served[3]).flatmap(mutated), label="body")
    refused_cleanly(served[1], fresh(body), inquiry)


# --- 2. through the app -------------------------------------------------------------------------------------------


def post(client: FlaskClient, path: str, data: bytes, content_type: str = FHIR) -> Any:
    return client.post(path, data=data, content_type=content_type)


@pytest.mark.parametrize("n", range(5), ids=["satisfied", "answered", "plain", "update", "inferno"])
@pytest.mark.parametrize("path", OPERATIONS, ids=["submit", "inquire"])
def test_the_valid_requests_are_answered(served: Served, n: int, path: str) -> None:
    client, _, _, valid = served
    resp = post(client, path, encoded(fresh(copy.deepcopy(valid[n]))))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["resourceType"] == ("Bundle" if path.endswith("submit") else "Parameters")


@PROPERTIES
@given(data=st.data(), path=st.sampled_from(OPERATIONS), wrapped=st.booleans())
def test_a_mutated_bundle_is_answered_below_500(served: Served, data: st.DataObject, path: str, wrapped: bool) -> None:
    client, _, unhandled, valid = served
    valid_bodies = [parameters(b) for b in valid] if wrapped else valid
    body = data.draw(st.sampled_from(valid_bodies).flatmap(mutated), label="body")
    check_answer(post(client, path, encoded(fresh(body))), unhandled)


@PROPERTIES
@given(value=json_values, path=st.sampled_from(OPERATIONS))
def test_any_json_is_answered_below_500(served: Served, value: Any, path: str) -> None:
    client, _, unhandled, _ = served
    check_answer(post(client, path, encoded(value)), unhandled)


@PROPERTIES
@given(data=st.data(), path=st.sampled_from(OPERATIONS), content_type=st.sampled_from([FHIR, "application/json"]))
def test_broken_bytes_are_answered_below_500(served: Served, data: st.DataObject, path: str, content_type: str) -> None:
    client, _, unhandled, valid = served
    raw = data.draw(st.sampled_from(valid).map(lambda b: encoded(fresh(copy.deepcopy(b)))).flatmap(raw_bytes))
    check_answer(post(client, path, raw, content_type), unhandled)


# --- the findings, kept as explicit examples ------------------------------------------------------------------------


def _claim(body: dict[str, Any]) -> dict[str, Any]:
    claim: dict[str, Any] = body["entry"][0]["resource"]
    return claim


def _answer_true(body: dict[str, Any]) -> None:
    body["entry"][7]["resource"]["item"][0]["answer"] = True


# (which valid request, how it is broken, the element the 400 names); each was a 500 before reading a Bundle was
# guarded by cds.pas.bundle.read_as_r4
FOUND: list[tuple[int, Callable[[dict[str, Any]], None], str]] = [
    # _sequences iterated a number (TypeError)
    (0, lambda b: _claim(b).update(supportingInfo=-3.5), "Claim.supportingInfo"),
    # `claim.get("insurance") or ()` iterated a number (TypeError)
    (0, lambda b: _claim(b).update(insurance=5), "Claim.insurance"),
    # `(insurance.get("coverage") or {}).get(...)` on a string (AttributeError)
    (0, lambda b: _claim(b)["insurance"][0].update(coverage="Coverage/cov-1"), "Claim.insurance[0].coverage"),
    # decide read productOrService.get on a string (AttributeError)
    (2, lambda b: _claim(b)["item"][0].update(productOrService="J7189"), "Claim.item[0].productOrService"),
    # cds.dtr.answers iterated an answer that is no list (TypeError)
    (1, _answer_true, "Bundle.entry[7].resource.item[0].answer"),
]


READ_BY_SUBMIT_ONLY = ("Claim.item[0].productOrService", "Bundle.entry[7].resource.item[0].answer")


@pytest.mark.parametrize(("n", "breaks", "expression"), FOUND)
@pytest.mark.parametrize("path", OPERATIONS, ids=["submit", "inquire"])
def test_the_findings_are_400s_naming_the_element(
    served: Served, n: int, breaks: Callable[[dict[str, Any]], None], expression: str, path: str
) -> None:
    client, rt, unhandled, valid = served
    if path.endswith("inquire") and expression.startswith(READ_BY_SUBMIT_ONLY):
        pytest.skip("an inquiry does not decide items, so it never reads this element")
    body = fresh(copy.deepcopy(valid[n]))
    breaks(body)
    with pytest.raises(CdsError) as err:
        read_bundle(rt, copy.deepcopy(body), inquiry=path.endswith("inquire"))
    check_client_error(err.value)
    assert err.value.expression == expression
    resp = post(client, path, encoded(body))
    check_answer(resp, unhandled)
    assert resp.status_code == 400 and resp.get_json()["issue"][0]["expression"] == [expression]
