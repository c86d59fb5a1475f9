"""DTR's payer work, free of HTTP: the package for a coverage assertion, and answers that settle it.

A package holds the assertion's form, the draft response the record prefilled, the libraries its CQL needs
(recursively) and their value sets. A completed response is read against its form (:mod:`cds.dtr.answers`), the
policy is evaluated again on the record the assertion was made on plus the answers, and the new determination is
stored under the same ``coverage-assertion-id`` with the response, in one transaction; the response goes back with
the CRD coverage-information at its root (``satisfied-pa-id`` when the answers meet the policy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cds import authorizations, constants, metrics
from cds.crd.assess import drug_inputs, patient_key  # the key CRD gives the patient: one PA serves CRD, DTR and PAS
from cds.crd.coverage_info import CoverageInfo, Reason, billing_codes
from cds.dtr import answers, forms, library, valuesets
from cds.dtr.publish import publish
from cds.errors import BusinessRule, Conflict, CoverageProblem, DataUnavailable, InvalidResource, NotFound
from cds.payers import CoverageChoice, payor_identifiers
from cds.records import Record, restore, snapshot
from cds.runtime import Runtime
from cds.store import AssertionRecord
from fhir_mappings.extract import ClinicalData, FactFinder, medication_codings
from policies import explain
from policies.engine import Answers, Decision, Determination, evaluate
from policies.model import Policy, Product
from policies.questions import open_questions

DONE_STATUSES = ("completed", "amended")


@dataclass(frozen=True)
class Settled:
    """What a completed response settled: the response as stored, the new coverage information, and the
    determination criterion by criterion (for the form page)."""

    assertion_id: str
    response: dict[str, Any]
    info: CoverageInfo
    decision: str
    pa_id: str | None
    summary: str
    criteria: list[dict[str, Any]] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)


# --- looking things up ------------------------------------------------------------------------------------------


def assertion(rt: Runtime, assertion_id: str) -> AssertionRecord:
    found = rt.store.assertion(assertion_id)
    if found is None:
        raise NotFound(f"No coverage assertion '{assertion_id[:64]}' is known here")
    return found


def policy_of(rt: Runtime, record: AssertionRecord) -> tuple[Policy, Product]:
    """The policy version and product an assertion was made under; a version no longer loaded is superseded."""
    pid, _, version = (record.policy or "").partition("|")
    policy = rt.policies.policies.get(pid)
    if policy is None or policy.version != version:
        raise Conflict(
            f"The assertion was made under {record.policy}, which this service no longer applies; sign the order "
            "again for a determination under the current policy"
        )
    product = next((p for p in policy.products if p.id == record.product), None)
    if product is None:
        raise Conflict(f"The product of the assertion is not in {policy.ref} any more; sign the order again")
    return policy, product


def questionnaire_of(rt: Runtime, canonical: str) -> dict[str, Any]:
    url, _, version = canonical.partition("|")
    prefix = f"{rt.base_url}/fhir/Questionnaire/"
    found = rt.store.questionnaire(url.removeprefix(prefix)) if url.startswith(prefix) else None
    if found is None or (version and found.get("version") != version):
        raise NotFound(f"The Questionnaire {canonical[:200]} is not one this service published")
    return found


# --- packages ----------------------------------------------------------------------------------------------------


class NoLongerNeeded(Conflict):
    """The assertion asks for no documentation (any more): DTR §oper-8 says why instead of sending a form."""


def no_longer_needed(record: AssertionRecord) -> NoLongerNeeded:
    if record.satisfied_pa_id:
        why = f"prior authorization {record.satisfied_pa_id} is on file for this order"
    elif record.covered == "not-covered":
        why = "the order is not covered (see the coverage information's reason)"
    elif record.decision in ("approved", "no-policy") or record.pa_needed in ("no-auth", "not-required"):
        why = "no prior authorization is needed for this order"
    else:
        why = f"the documentation was received and the request is {record.decision}"
    return NoLongerNeeded(f"No documentation is needed for this coverage assertion any more: {why}.")


def package_for(rt: Runtime, assertion_id: str, *, shape: str | None = None) -> dict[str, Any]:
    """The DTR package Bundle for one assertion: its Questionnaire first, the prefilled response, then every Library
    its CQL needs and their ValueSets. Raises NotFound, or NoLongerNeeded when the assertion asks for nothing."""
    record = assertion(rt, assertion_id)
    if not record.questionnaire:
        raise no_longer_needed(record)
    policy, _product = policy_of(rt, record)
    questionnaire = questionnaire_of(rt, record.questionnaire)
    return bundle(rt, policy, questionnaire, dict(record.draft_response or {}), shape=shape)


def bundle(
    rt: Runtime,
    policy: Policy,
    questionnaire: Mapping[str, Any],
    draft: Mapping[str, Any],
    *,
    shape: str | None = None,
) -> dict[str, Any]:
    shape = shape or str(rt.config["dtr_version"])
    response = _shaped(draft, shape)
    entries: list[dict[str, Any]] = [
        {"fullUrl": questionnaire["url"], "resource": shaped_form(questionnaire, shape)},
        {"fullUrl": f"urn:uuid:{rt.new_id()}", "resource": response},
    ]
    for resource in [*library.libraries(policy, rt.mappings), *valuesets.value_sets(policy, rt.mappings)]:
        entries.append({"fullUrl": resource["url"], "resource": resource})
    out: dict[str, Any] = {
        "resourceType": "Bundle",
        "meta": {"profile": [constants.DTR_PACKAGE_BUNDLE_PROFILE]},
        "type": "collection",
        "timestamp": rt.clock().isoformat(timespec="seconds"),
        "entry": entries,
    }
    return out


def shaped_form(questionnaire: Mapping[str, Any], shape: str) -> dict[str, Any]:
    """The Questionnaire in the requested DTR shape: 2.2.0 as made (its cqf-library names the library version,
    DTR §oper-16); 2.0.1 names the library by its url alone, as Inferno's DTR payer suite matches it to a
    packaged ``Library.url`` (the package carries exactly one version of it)."""
    form = dict(questionnaire)
    if shape != "2.0.1":
        return form
    form["extension"] = [
        {**e, "valueCanonical": str(e["valueCanonical"]).split("|", 1)[0]}
        if e.get("url") == constants.CQF_LIBRARY and "valueCanonical" in e
        else e
        for e in form.get("extension") or ()
    ]
    return form


def _shaped(draft: Mapping[str, Any], shape: str) -> dict[str, Any]:
    """The draft response in the requested DTR shape: 2.2.0 as made; 2.0.1 (what Inferno validates) links the
    Coverage with ``qr-context`` as well and writes the origin of prefilled answers ``auto``."""
    response = dict(draft)
    if shape != "2.0.1":
        return response
    extensions = []
    for ext in response.get("extension") or ():
        if ext.get("url") == constants.DTR_QR_COVERAGE:
            extensions.append({**ext, "url": constants.DTR_QR_CONTEXT})
        else:
            extensions.append(ext)
    response["extension"] = extensions

    def older(item: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(item)
        out["answer"] = [
            {
                **a,
                "extension": [
                    {
                        **e,
                        "extension": [
                            {**p, "valueCode": "auto"} if p.get("valueCode") in ("auto-server", "auto-client") else p
                            for p in e.get("extension") or ()
                        ],
                    }
                    if e.get("url") == constants.DTR_INFORMATION_ORIGIN
                    else e
                    for e in a.get("extension") or ()
                ],
            }
            for a in item.get("answer") or ()
        ]
        return out

    if response.get("item"):
        response["item"] = [older(i) for i in response["item"]]
    return response


# --- answers -----------------------------------------------------------------------------------------------------


def the_response(body: Any) -> dict[str, Any]:
    """The QuestionnaireResponse of a submission: sent bare, or as a DTR QuestionnaireResponse Bundle (a collection
    whose first entry is the response, DTR dtrb-2)."""
    if not isinstance(body, Mapping):
        raise InvalidResource("Send a QuestionnaireResponse, or a DTR QuestionnaireResponse Bundle")
    if body.get("resourceType") == "Bundle":
        entries = body.get("entry")
        head = entries[0] if isinstance(entries, list) and entries else None
        first = head.get("resource") if isinstance(head, Mapping) else None
        if body.get("type") != "collection" or not isinstance(first, Mapping):
            raise InvalidResource(
                "A DTR QuestionnaireResponse Bundle is a collection whose first entry is the response",
                expression="Bundle.entry[0]",
            )
        body = first
    if body.get("resourceType") != "QuestionnaireResponse":
        raise InvalidResource(
            f"Expected a QuestionnaireResponse, got {str(body.get('resourceType'))[:40]}", expression="resourceType"
        )
    return dict(body)


def assertion_id_of(rt: Runtime, response: Mapping[str, Any]) -> str:
    """The coverage assertion a response documents: its identifier, as the package's draft gave it."""
    ident = response.get("identifier")
    system = rt.base_url + constants.ASSERTION_ID_PATH
    if isinstance(ident, Mapping) and ident.get("system") == system and isinstance(ident.get("value"), str):
        return str(ident["value"])
    raise InvalidResource(
        f"The response does not name the coverage assertion it documents (identifier with system {system}, as in "
        "the package's QuestionnaireResponse)",
        expression="QuestionnaireResponse.identifier",
    )


def _same_patient(given: Any, expected: str) -> bool:
    ref = given.get("reference") if isinstance(given, Mapping) else None
    return isinstance(ref, str) and bool(expected) and ref.rsplit("/", 2)[-2:] == expected.split("/")[-2:]


def submit(rt: Runtime, body: Any, *, via: str = "fhir", today: Any = None) -> Settled:
    """Settle the assertion a completed response documents. Nothing is stored unless every check passes."""
    response = the_response(body)
    if response.get("status") not in DONE_STATUSES:
        raise InvalidResource(
            "Only a completed QuestionnaireResponse settles a determination (status completed or amended)",
            expression="QuestionnaireResponse.status",
        )
    assertion_id = assertion_id_of(rt, response)
    record = assertion(rt, assertion_id)
    canonical = str(response.get("questionnaire") or "")
    if not record.questionnaire:
        raise no_longer_needed(record)
    if canonical != record.questionnaire:
        url = canonical.partition("|")[0]
        if url == record.questionnaire.partition("|")[0]:
            raise Conflict(f"The response answers {canonical[:200]}, superseded by {record.questionnaire}")
        raise BusinessRule(
            f"The response answers {canonical[:200] or 'no Questionnaire'}; this assertion asks {record.questionnaire}",
            expression="QuestionnaireResponse.questionnaire",
        )
    policy_of(rt, record)  # superseded policies are refused before the answers are read
    questionnaire = questionnaire_of(rt, canonical)
    day = today or rt.clock().date()
    kept = record_of(rt, record, day)
    if not _same_patient(response.get("subject"), kept.patient):
        raise BusinessRule(
            "The response is about another patient than the order it documents",
            expression="QuestionnaireResponse.subject",
        )
    author = (response.get("author") or {}).get("reference") if isinstance(response.get("author"), Mapping) else None
    read = answers.read(questionnaire, response, record.draft_response or {}, author=author)
    if read.values.pop(constants.ATTESTATION_LINK, None) is not True:
        raise InvalidResource(
            "The form is not signed: answer the attestation with yes", expression="QuestionnaireResponse.item"
        )
    return settle(rt, record, kept, read.values, read.response, questionnaire=canonical, via=via, today=day)


def record_of(rt: Runtime, record: AssertionRecord, today: Any) -> Record:
    """The record the assertion was made on, evaluated as of ``today``."""
    raw = rt.store.assertion_record(record.assertion_id)
    if raw is None:
        raise Conflict("This assertion was made without the record it rests on; sign the order again")
    return restore(raw, today)


def determine(
    rt: Runtime, record: AssertionRecord, kept: Record, values: Mapping[str, Any], *, source: str, today: Any
) -> Determination:
    """The policy evaluated again on the assertion's record plus these answers (nothing stored)."""
    policy, product = policy_of(rt, record)
    facts = FactFinder(rt.mappings, kept.clinical)
    given = Answers(dict(values), source)
    return evaluate(policy, product, rt.mappings, facts, kept.order, today, given, companions=kept.companions)


def settle(
    rt: Runtime,
    record: AssertionRecord,
    kept: Record,
    values: Mapping[str, Any],
    response: Mapping[str, Any],
    *,
    questionnaire: str,
    via: str,
    today: Any,
) -> Settled:
    """Evaluate the answers (already read and checked, attestation removed) and store what they settle, with the
    response (coverage-information at its root) in one transaction. Issues the PA when they meet the policy."""
    assertion_id = record.assertion_id
    source = f"QuestionnaireResponse/{response['id']}" if isinstance(response.get("id"), str) else "answers"
    det = determine(rt, record, kept, values, source=source, today=today)
    policy = det.policy
    info = _coverage_info(rt, det, record, kept.coverage, via)
    stored = _answered(response, info)
    trace = {**explain.trace(det), "answers": source, "via": via}
    ok = rt.store.settle_assertion(
        assertion_id,
        was=str(record.questionnaire),
        response=stored,
        questionnaire=questionnaire,
        via=via,
        decision=det.decision.value,
        covered=info.covered,
        pa_needed=info.pa_needed,
        satisfied_pa_id=info.satisfied_pa_id,
        still_asked=None,
        extension=info.as_json(),
        trace=trace,
        received_at=rt.clock(),
    )
    if not ok:
        raise Conflict("Another response settled this assertion meanwhile; open the form again to see its decision")
    metrics.decided("dtr", policy.id, metrics.coverage_outcome(info.covered, info.pa_needed))
    return Settled(
        assertion_id=assertion_id,
        response=stored,
        info=info,
        decision=det.decision.value,
        pa_id=info.satisfied_pa_id,
        summary=info.reasons[0].text if info.reasons else explain.headline(det),
        criteria=[
            {"id": r.id, "text": r.text, "state": r.state.value, "evidence": list(r.evidence), "note": r.note}
            for r in explain.rows(det)
        ],
        policy={
            "ref": policy.ref,
            "title": f"{policy.number} {policy.title}",
            "url": f"{rt.base_url}/policies/{policy.id}",
        },
    )


def _answered(response: Mapping[str, Any], info: CoverageInfo) -> dict[str, Any]:
    """The response with the new coverage-information at its root (DTR §spec-33), replacing any earlier one."""
    out = dict(response)
    kept = [e for e in out.get("extension") or () if e.get("url") != constants.COVERAGE_INFO_URL]
    out["extension"] = [*kept, info.as_json()]
    return out


def _open(det: Determination) -> str:
    unknown = [r for r in explain.rows(det) if r.state.value == "unknown"]
    return "; ".join(f"{r.id}{' (' + r.note + ')' if r.note else ''}" for r in unknown[:4])


def _coverage_info(rt: Runtime, det: Determination, record: AssertionRecord, coverage: str, via: str) -> CoverageInfo:
    """The coverage information the answers give. The service approves what the policy settles and never denies
    what it does not: everything else is pended for a reviewer, with the reason."""
    policy, product = det.policy, det.product
    stamp: dict[str, Any] = {
        "coverage": coverage,
        "today": det.today,
        "assertion_id": record.assertion_id,
        "billing_codes": billing_codes(rt.mappings, product),
    }
    decision = det.decision
    if decision is Decision.APPROVED:
        issued = authorizations.issue(rt, det, record.payer_id, record.patient_key, record.assertion_id)
        met = det.chosen.indication if det.chosen else None
        basis = f"{met.id} {met.title}, every criterion met" if met else "criteria met"
        why = (
            f"{policy.ref}: {basis} with the answers given; prior authorization {issued.pa_id} "
            f"{authorizations.until(issued)} ({product.authorization.id})"
        )
        return CoverageInfo(
            covered="covered", pa_needed="satisfied", satisfied_pa_id=issued.pa_id, reasons=(Reason(why),), **stamp
        )
    if decision is Decision.NOT_COVERED:
        return CoverageInfo(
            covered="not-covered", reasons=(Reason(f"{policy.ref}: {explain.failed_text(det)}"),), **stamp
        )
    if decision is Decision.REVIEW and product.off_label_review is not None:
        review = product.off_label_review
        why = f"{policy.ref}: pended for {review.id} review ({review.text}); the documentation was received"
        return CoverageInfo(
            covered="conditional", pa_needed="auth-needed", info_needed=("OTH",), reasons=(Reason(why),), **stamp
        )
    if decision is Decision.DOCUMENTATION and product.documentation is not None:
        why = (
            f"{policy.ref}: the criteria are met and the documentation {product.documentation.id} asks for was "
            "received; pended for clinical review"
        )
    elif decision is Decision.DOSE_REVIEW:
        over = "; ".join(f"{d.id}: {explain.shown(d.note)}" for d in det.doses if d.state.value == "not-met")
        why = f"{policy.ref}: the dose exceeds the policy limit ({over}); pended for clinical review"
    else:
        why = f"{policy.ref}: the answers leave open {_open(det) or 'the determination'}; pended for clinical review"
    return CoverageInfo(covered="covered", pa_needed="auth-needed", reasons=(Reason(why),), **stamp)


# --- stand-alone: orders without a CRD context ------------------------------------------------------------------


@dataclass(frozen=True)
class _Unreadable:
    """A data source that reads nothing: a DTR call carries no EHR access, only the resources it was given."""

    ok: bool = False
    note: str = "a payor Organization must be given on the reference (identifier) or contained in the Coverage"
    resources: tuple[Mapping[str, Any], ...] = ()

    def read(self, _target: str) -> _Unreadable:
        return self


def standalone(
    rt: Runtime, coverage: Mapping[str, Any], orders: list[Mapping[str, Any]], client: str | None
) -> list[tuple[AssertionRecord, Policy, dict[str, Any]]]:
    """Forms for orders sent without a CRD context (DTR stand-alone launch): each MedicationRequest our payer has a
    policy for is evaluated on the order alone (the DTR client's CQL prepopulates from the EHR), its form published,
    and an assertion made so that the answers can settle it. Orders of other kinds, or drugs without a policy, need
    no form."""

    try:
        identifiers = payor_identifiers(coverage, _Unreadable())  # type: ignore[arg-type]
    except DataUnavailable as exc:
        raise BusinessRule(exc.message, expression="coverage.payor") from None
    payer = rt.payers.match(identifiers)
    if payer is None:
        raise CoverageProblem("The Coverage names no payer this service decides for", expression="coverage.payor")
    choice = CoverageChoice(coverage, payer)
    today = rt.clock().date()
    out = []
    for order in orders:
        if order.get("resourceType") != "MedicationRequest":
            continue
        inputs = drug_inputs(rt, medication_codings(order, (), rt.mappings.product_names))
        match = rt.policies.find(payer.policies, inputs)
        if match is None:
            continue
        policy, product = match
        subject = order.get("subject") or coverage.get("beneficiary") or {}
        patient = str(subject.get("reference") or "") if isinstance(subject, Mapping) else ""
        clinical = ClinicalData(today=today, order=order)
        det = evaluate(policy, product, rt.mappings, FactFinder(rt.mappings, clinical), order, today)
        questions = open_questions(det, rt.mappings)
        if not questions:
            continue
        questionnaire = publish(rt, policy, product, questions)
        assertion_id = rt.new_id()

        draft = forms.draft_response(
            questionnaire,
            questions,
            patient=patient,
            coverage=choice.reference,
            order=f"MedicationRequest/{order.get('id')}",
            today=today,
            base_url=rt.base_url,
            assertion_id=assertion_id,
        )
        canonical = forms.canonical(questionnaire)
        info = CoverageInfo(
            coverage=choice.reference,
            covered="covered",
            today=today,
            assertion_id=assertion_id,
            pa_needed="auth-needed",
            doc_needed="clinical",
            doc_purpose="withpa",
            questionnaires=(canonical,),
            billing_codes=billing_codes(rt.mappings, product),
            reasons=(Reason(f"{policy.ref}: documentation requested by a DTR client for this order"),),
        )
        record = AssertionRecord(
            assertion_id=assertion_id,
            hook_instance=f"dtr:{assertion_id}",
            payer_id=payer.id,
            patient_key=patient_key(choice, client, patient.rsplit("/", 1)[-1]),
            order_ref=f"MedicationRequest/{order.get('id')}",
            policy=policy.ref,
            product=product.id,
            decision=det.decision.value,
            covered="covered",
            pa_needed="auth-needed",
            satisfied_pa_id=None,
            questionnaire=canonical,
            extension=info.as_json(),
            trace=explain.trace(det),
            draft_response=draft,
            record=snapshot(clinical, (), patient=patient, coverage=choice.reference),
        )
        out.append((record, policy, questionnaire))
    return out
