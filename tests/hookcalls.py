"""Calling the hook services in tests, and what every response must satisfy."""

from __future__ import annotations

from typing import Any

from builders import COVERAGE_INFO, coverage_info
from conftest import BASE, post_hook
from flask.testing import FlaskClient

from cds.crd.coverage_info import problems


def check_response_shape(body: dict[str, Any], hook: str = "order-sign") -> None:
    """What every response must satisfy (CDS Hooks 2.0, CRD 2.2 and the CRD 2.0.1 shape Inferno validates)."""
    assert isinstance(body["cards"], list)
    for card in body["cards"]:
        assert len(card["summary"]) < 140
        assert card["indicator"] in ("info", "warning", "critical")
        assert card["source"]["label"]
        assert card["source"]["topic"]["system"] and card["source"]["topic"]["code"]
        assert card["uuid"]
        for suggestion in card.get("suggestions", []):
            assert suggestion["uuid"] and suggestion["label"]
            assert card["selectionBehavior"] in ("at-most-one", "any")
            for action in suggestion["actions"]:
                assert action["type"] in ("create", "update", "delete") and action["description"]
        for link in card.get("links", []):
            assert link["type"] == "absolute" and link["url"].startswith("http")
    for action in body.get("systemActions", []):
        assert action["type"] == "update" and action["description"]
        ext = [e for e in action["resource"]["extension"] if e["url"] == COVERAGE_INFO]
        assert ext and not problems(ext[-1]), problems(ext[-1])
        names = {s["url"] for s in ext[-1]["extension"]}
        assert not names & {"detail", "contact", "expiry-date"}, "shape must also validate under CRD 2.0.1"
    if hook == "order-sign":  # always the key, [] when no order is due an action (Inferno requires it)
        assert isinstance(body.get("systemActions"), list), "order-sign always carries systemActions"
    else:
        assert "systemActions" not in body or body["systemActions"], "a secondary hook omits an empty systemActions"


def decide(
    client: FlaskClient, body: dict[str, Any], service: str = "order-sign"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The response of a call with one MedicationRequest, and its coverage-information as {url: [values]}."""
    resp = post_hook(client, body, service)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    data = resp.get_json()
    check_response_shape(data, service)
    return data, coverage_info(data["systemActions"][0]["resource"])


def asked(client: FlaskClient, info: dict[str, Any]) -> list[str]:
    """The linkIds the form named by the coverage-information asks when it opens: its questions (not the display
    items, not the closing attestation) that the prefilled draft response enables (enableWhen on a choice)."""
    url = info["questionnaire"][0].split("|")[0].removeprefix(BASE)
    form = client.get(url).get_json()
    draft = client.get(f"/fhir/QuestionnaireResponse/{info['coverage-assertion-id'][0]}").get_json()
    chosen = {i["linkId"]: i["answer"][0].get("valueCoding", {}).get("code") for i in draft.get("item", [])}
    return [
        i["linkId"]
        for i in form["item"]
        if i["type"] != "display"
        and i["linkId"] != "attestation"
        and all(chosen.get(w["question"]) == w["answerCoding"]["code"] for w in i.get("enableWhen", ()))
    ]
