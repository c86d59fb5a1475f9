"""The same order, three payers: the Coverage's payer picks the policy set (issue 3)."""

from __future__ import annotations

from typing import Any

from builders import (
    HCPCS,
    LOINC,
    NDC,
    SCT,
    condition,
    coverage,
    hook_request,
    med_order,
    observation,
)
from flask.testing import FlaskClient
from hookcalls import asked, decide


def qualitative(loinc: str, negative: bool, when: str = "2026-11-01") -> dict[str, Any]:
    code = "260385009" if negative else "10828004"
    return {
        "resourceType": "Observation",
        "id": f"obs-{loinc}",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": "Patient/pat-1"},
        "effectiveDateTime": f"{when}T08:00:00Z",
        "valueCodeableConcept": {"coding": [{"system": SCT, "code": code}]},
    }


def hemgenix_request(payer: str, ndc: str = "00053-0150-15", **kw: Any) -> dict[str, Any]:
    order = med_order(
        code="J1411",
        dose=None,
        dispenseRequest={
            "quantity": {"value": 1, "unit": "kit", "system": "http://unitsofmeasure.org", "code": "{kit}"}
        },
    )
    order["medicationCodeableConcept"]["coding"].append({"system": NDC, "code": ndc})
    prophylaxis = {
        "resourceType": "MedicationStatement",
        "id": "ms-fix",
        "status": "active",
        "subject": {"reference": "Patient/pat-1"},
        "medicationCodeableConcept": {"coding": [{"system": HCPCS, "code": "J7201"}]},
    }
    return hook_request(
        [order],
        the_coverage=coverage(payer=payer),
        history=[prophylaxis],
        conditions=[condition("D67"), condition("I61.9")],
        observations=[
            observation("29463-7", 72, "kg"),
            observation("3187-2", 1, "%"),
            observation("3185-6", 0.1, "[beth'U]/mL"),
            observation("777-3", 180, "10*3/uL"),
            qualitative("5196-1", True),
            qualitative("11259-9", True),
        ],
        **kw,
    )


def test_pharmacy_109_answers_for_its_payer(client: FlaskClient) -> None:
    _, info = decide(client, hemgenix_request("ny-pharmacy-109"))
    assert info["covered"] == ["covered"] and info["pa-needed"] == ["auth-needed"]
    assert info["reason"][0]["text"].startswith("ph109-gene-therapy|2:")
    items = asked(client, info)
    # the record settles age, diagnosis, factor IX level, inhibitor titer, hepatitis B/C, platelets; the
    # attestations, the exposure days (factor IX prophylaxis is on record) and the FibroScan value are asked
    assert items == [
        "PH109-H1",
        "PH109-H4a",
        "PH109-H4b",
        "PH109-H5",
        "PH109-H6.history",
        "PH109-H7",
        "PH109-H8d.kpa",
        "PH109-H8d.other",
        "PH109-G2",
    ]
    assert "PH109-H8d.kpa" in items and "PH109-H3" not in items and "PH109-H8c" not in items


def test_bcbsks_answers_for_its_payer(client: FlaskClient) -> None:
    data, info = decide(client, hemgenix_request("bcbsks"))
    assert info["pa-needed"] == ["auth-needed"] and info["reason"][0]["text"].startswith("bcbsks-hemgenix|2:")
    items = asked(client, info)
    assert "KS-III.8.7pt" in items and items[-1] == "KS-III.0" and not any(i.startswith("PH109") for i in items)


def test_cigna_has_no_hemgenix_policy(client: FlaskClient) -> None:
    _, info = decide(client, hemgenix_request("cigna"))
    assert info["covered"] == ["covered"] and info["pa-needed"] == ["no-auth"]


def test_the_wrong_kit_for_the_weight_is_proposed_right(client: FlaskClient) -> None:
    answers_needed, _ = decide(client, hemgenix_request("bcbsks", ndc="00053-0200-20"))
    card = next(c for c in answers_needed["cards"] if c["source"]["topic"]["code"] == "therapy-alternatives-opt")
    suggestion = card["suggestions"][0]
    assert "15-vial kit (00053-0150-15)" in suggestion["label"]
    proposed = suggestion["actions"][0]["resource"]["medicationCodeableConcept"]["coding"]
    assert {"system": NDC, "code": "00053-0150-15", "display": "15-vial kit"} in proposed
    assert all(c.get("code") != "00053-0200-20" for c in proposed)


def test_a_lab_older_than_three_months_is_asked_again(client: FlaskClient) -> None:
    body = hemgenix_request("ny-pharmacy-109")
    for entry in body["prefetch"]["observations"]["entry"]:
        if entry["resource"]["id"] == "obs-777-3":
            entry["resource"]["effectiveDateTime"] = "2026-05-01T08:00:00Z"
    _, info = decide(client, body)
    assert "PH109-H8c" in asked(client, info)
