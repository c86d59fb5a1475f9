"""Coverage requirements for the draft orders of one hook call: parse → map → evaluate → the extension.

For each in-scope MedicationRequest: identify the drug, find the payer's policy for it, gather the record, evaluate,
and state the result as a coverage-information extension (with the Questionnaire for what is missing, or the prior
authorization it satisfies). Cards are rendered from the result elsewhere (:mod:`cds.crd.cards`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date
from typing import Any
from urllib.parse import urlencode

from cds import authorizations
from cds.constants import OPTION_FORM_COMPLETION, OPTION_UNSOLICITED
from cds.crd import coverage_info
from cds.crd.coverage_info import CoverageInfo, Reason
from cds.crd.hookrequest import HookRequest
from cds.crd.prefetch import SOURCE_ORDER, SOURCES, Fetched, check_resource, open_source, sources_of
from cds.dtr import forms
from cds.dtr.publish import publish
from cds.errors import DataUnavailable
from cds.payers import CoverageChoice, choose_coverage
from cds.records import snapshot
from cds.runtime import Runtime
from cds.store import AssertionRecord, PriorAuth
from fhir_mappings.extract import ClinicalData, FactFinder, medication_codings, ref
from policies import explain
from policies.engine import Decision, Determination, evaluate
from policies.model import Policy, Product
from policies.questions import Question, open_questions, shown


@dataclass(frozen=True)
class _Stamp:
    """What every assertion of one order carries: the Coverage it applies to, the date, its id."""

    coverage: str
    today: date
    assertion_id: str

    def info(self, **details: Any) -> CoverageInfo:
        return CoverageInfo(coverage=self.coverage, today=self.today, assertion_id=self.assertion_id, **details)


@dataclass(frozen=True)
class Assessed:
    """One order's result: what we tell the EHR about it and what we keep."""

    order: Mapping[str, Any]
    drug: str  # the drug's name, for people
    info: CoverageInfo
    determination: Determination | None = None
    questions: tuple[Question, ...] = ()
    questionnaire: Mapping[str, Any] | None = None
    draft_response: Mapping[str, Any] | None = None
    prior_auth: PriorAuth | None = None
    unchanged: bool = False  # the order already carries this assertion: no system action (CRD §resp-29)
    client_has_questionnaire: bool = False  # the EHR already holds the Questionnaire (CRD §dev-20): no create
    notes: tuple[str, ...] = ()
    record: Mapping[str, Any] | None = None  # the record it was decided on (cds.records), for DTR and PAS

    @property
    def reference(self) -> str:
        return f"{self.order.get('resourceType')}/{self.order.get('id')}"

    @property
    def extension(self) -> dict[str, Any]:
        return self.info.as_json()


@dataclass(frozen=True)
class Assessment:
    coverage: CoverageChoice
    patient_key: str
    orders: tuple[Assessed, ...]
    queried: tuple[str, ...]

    def records(self, hook_instance: str) -> list[AssertionRecord]:
        """The assertions to keep: every order's, but those that repeat what the order already carried."""
        out = []
        for a in self.orders:
            if a.unchanged:
                continue
            det = a.determination
            out.append(
                AssertionRecord(
                    assertion_id=a.info.assertion_id,
                    hook_instance=hook_instance,
                    payer_id=self.coverage.payer.id,
                    patient_key=self.patient_key,
                    order_ref=a.reference,
                    policy=det.policy.ref if det else None,
                    product=det.product.id if det else None,
                    decision=det.decision.value if det else "no-policy",
                    covered=a.info.covered,
                    pa_needed=a.info.pa_needed,
                    satisfied_pa_id=a.info.satisfied_pa_id,
                    questionnaire=a.info.questionnaires[0] if a.info.questionnaires else None,
                    extension=a.extension,
                    trace=_trace(a),
                    draft_response=a.draft_response,
                    record=a.record,
                )
            )
        return out


def patient_key(choice: CoverageChoice, client: str | None, patient_id: str) -> str:
    """A stable, non-identifying key (a hash; no identifier is stored in clear) for the patient under this Coverage:
    the payer, who the EHR says the patient is (context.patientId, within the verified client that sent it) and who
    the Coverage says it covers (:attr:`CoverageChoice.identity`: its id, subscriber and member ids, dependent number
    and beneficiary). fhirServer is left out: it is optional, and the same order must get the same answer whether its
    data was prefetched or queried.

    A prior authorization is reused only under the same key, product and policy|version (Store.issue_prior_auth):
    another member of a family coverage (same subscriberId), or the same patient under another Coverage, gets their
    own. Keys made before this hashed the payer and member id alone; authorizations stored under them match no
    lookup any more, so the next approved order-sign for such a patient issues a new one."""
    basis = ["patient-v2", choice.payer.id, client or "", patient_id, *choice.identity]
    return hashlib.sha256(json.dumps(basis).encode()).hexdigest()[:40]


def _drug_name(order: Mapping[str, Any], found: Sequence[Mapping[str, Any]]) -> str:
    concept = order.get("medicationCodeableConcept") or {}
    if isinstance(concept, Mapping) and concept.get("text"):
        return str(concept["text"])
    for c in found:
        if c.get("display"):
            return str(c["display"])
    ref = (order.get("medicationReference") or {}).get("display")
    return str(ref) if ref else "this medication"


class _Context:
    """One hook call: the runtime, the request, where its data comes from."""

    def __init__(self, rt: Runtime, request: HookRequest, primary: bool) -> None:
        self.rt = rt
        self.request = request
        self.primary = primary
        self.today: date = rt.clock().date()
        self.source = open_source(rt, request)
        self._data: dict[str, Fetched] = {}

    def locations(self, encounter: Mapping[str, Any] | None) -> tuple[Mapping[str, Any], ...]:
        """The encounter's locations (prefetched or read); one that cannot be read is left out."""
        out: list[Mapping[str, Any]] = []
        for entry in (encounter or {}).get("location") or ():
            target = ((entry or {}).get("location") or {}).get("reference")
            if isinstance(target, str) and "Location/" in target:
                got = self.source.read("Location/" + target.rsplit("/", 1)[-1])
                out.extend(r for r in got.resources if r.get("resourceType") == "Location")
        return tuple(out)

    def _where(self, name: str, resource: Mapping[str, Any]) -> str:
        """Where a resource of a source was sent: ``prefetch.conditions.entry[2].resource`` (the source's first
        prefetch key for one read from the EHR, whose problems are 412s that name no element)."""
        for key in SOURCES[name]:
            value = self.request.prefetch.get(key)
            if value is resource:
                return f"prefetch.{key}"
            entries = value.get("entry") if isinstance(value, Mapping) else None
            for i, entry in enumerate(entries if isinstance(entries, list) else ()):
                if isinstance(entry, Mapping) and entry.get("resource") is resource:
                    return f"prefetch.{key}.entry[{i}].resource"
        return f"prefetch.{SOURCES[name][0]}"

    def option(self, code: str, default: Any) -> Any:
        return self.request.configuration.get(code, default)

    def data(self, names: frozenset[str]) -> dict[str, Fetched]:
        """The named sources (cds.crd.prefetch.SOURCES), each fetched once for all orders of the call. A source that
        was neither prefetched nor can be queried is a 412; one whose query failed is left out (the answer degrades)."""
        wanted = [n for n in SOURCE_ORDER if n in names and n not in self._data]
        self.source.fetch(k for n in wanted for k in SOURCES[n])  # the missing keys are queried in parallel
        for name in wanted:
            self._data[name] = self.source.source(name)
            if name == "patient":
                for patient in _of(self._data[name], "Patient")[:1]:
                    check_resource(patient, "prefetch.patient", self._data[name])
        missing = [n for n in wanted if self._data[n].status == "unavailable"]
        if missing:
            raise DataUnavailable(
                f"Data for {', '.join(missing)} was neither prefetched nor can it be queried: "
                f"{self.source.why_not} (send the prefetch keys from discovery, or an allowed fhirServer and "
                "fhirAuthorization)"
            )
        return {n: self._data[n] for n in names if n in self._data}

    def check_r4(self, data: Mapping[str, Fetched], only: frozenset[str] | None = None) -> None:
        """The resources a decision reads from ``data`` (those of ``only``, by ``Type/id``, when given) are FHIR R4,
        or a 400 (prefetch) / 412 (the EHR's data) naming the element.

        Validating costs about 0.4 ms a resource, and a chart may hold hundreds, so :func:`_assess_order` checks
        the resources the determination cites as evidence (a malformed element that the extraction read as absent
        must not become proof: a ``clinicalStatus`` sent as a string would make a Condition active), and all of
        them only when reading the data failed (a precise 400 instead of a 500)."""
        for name, fetched in data.items():
            for resource in _of(fetched, *SOURCE_TYPES[name]):
                if only is None or ref(resource) in only:
                    check_resource(resource, self._where(name, resource), fetched)


@dataclass(frozen=True)
class _Job:
    """One order of the call, with what every assertion about it carries."""

    ctx: _Context
    choice: CoverageChoice
    patient_key: str
    order: Mapping[str, Any]
    drug: str
    stamp: _Stamp
    record: Mapping[str, Any] | None = None

    def result(self, info: CoverageInfo, det: Determination | None = None, **more: Any) -> Assessed:
        return Assessed(self.order, self.drug, info, det, record=self.record, **more)


def assess(rt: Runtime, request: HookRequest, orders: Sequence[Mapping[str, Any]], *, primary: bool) -> Assessment:
    """Coverage information for each MedicationRequest in ``orders`` (the in-scope draft orders)."""
    ctx = _Context(rt, request, primary)
    try:
        choice = choose_coverage(ctx.source, rt.payers)
        key = patient_key(choice, request.client, str(request.context.get("patientId") or ""))
        out = [_assess_order(ctx, choice, key, o) for o in orders if o.get("resourceType") == "MedicationRequest"]
        return Assessment(choice, key, tuple(out), tuple(ctx.source.queried))
    finally:
        ctx.source.close()


def _medications(ctx: _Context, order: Mapping[str, Any]) -> tuple[tuple[Mapping[str, Any], ...], str]:
    """The Medication an order references on the EHR (contained ones are read from the order itself)."""
    target = (order.get("medicationReference") or {}).get("reference")
    if not isinstance(target, str) or target.startswith("#") or not target:
        return (), ""
    got = ctx.source.read("Medication/" + target.rsplit("/", 1)[-1])
    if got.status == "unavailable":
        raise DataUnavailable(f"The ordered {target} is needed to identify the drug: {got.note}")
    return got.resources, got.note


def _assess_order(ctx: _Context, choice: CoverageChoice, key: str, order: Mapping[str, Any]) -> Assessed:
    rt = ctx.rt
    stamp = _Stamp(choice.reference, ctx.today, rt.new_id())
    medications, med_note = _medications(ctx, order)
    found = medication_codings(order, medications, rt.mappings.product_names)
    ordered = drug_inputs(rt, found)
    job = _Job(ctx, choice, key, order, _drug_name(order, found), stamp)
    if med_note and not found:
        reason = Reason(f"The ordered medication could not be identified: {med_note}", "technical")
        info = stamp.info(covered="indeterminate", pa_needed="indeterminate", reasons=(reason,))
        return _finish(ctx, job.result(info, notes=(med_note,)))
    match = rt.policies.find(choice.payer.policies, ordered)
    if match is None:
        return _finish(ctx, job.result(stamp.info(covered="covered", pa_needed="no-auth")))
    policy, product = match
    data = ctx.data(sources_of(rt.mappings, product))
    try:
        assessed = _decide(job, policy, product, data, medications)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        # the extraction reads R4 types: a resource that is not R4 is the client's mistake, named by check_r4;
        # when every resource is R4 the fault is ours, and the error goes on (a 500 with an incident id)
        ctx.check_r4(data)
        raise
    if assessed.determination is not None:
        ctx.check_r4(data, only=_evidence(assessed.determination))
    return _finish(ctx, assessed)


def _evidence(det: Determination) -> frozenset[str]:
    """Every reference a determination's findings and dose results cite (``Condition/c1``, ``answer#x``...)."""
    roots = [f for result in det.indications for f in result.findings]
    roots += [f for f in (det.selection, det.renewal) if f is not None] + [*det.others, *det.not_covered]
    cited = {e for root in roots for finding in root.walk() for e in finding.evidence}
    cited.update(e for dose in det.doses for e in dose.evidence)
    return frozenset(cited)


def _decide(
    job: _Job, policy: Policy, product: Product, data: Mapping[str, Fetched], medications: Sequence[Mapping[str, Any]]
) -> Assessed:
    """The policy evaluated on the order's data (the sources it reads, fetched): pure, nothing stored yet."""
    ctx, order, choice = job.ctx, job.order, job.choice
    rt = ctx.rt

    def of_source(name: str, *types: str) -> tuple[Mapping[str, Any], ...]:
        return _of(data[name], *(types or SOURCE_TYPES[name])) if name in data else ()

    encounter = next(iter(of_source("encounter")), None)
    clinical = ClinicalData(
        today=ctx.today,
        order=order,
        patient=next(iter(of_source("patient")), None),
        conditions=of_source("conditions"),
        observations=of_source("observations"),
        practitioner_roles=of_source("practitioners", "PractitionerRole"),
        practitioners=of_source("practitioners", "Practitioner"),
        medications=tuple(medications),
        medication_history=of_source("medication_history"),
        procedures=of_source("procedures"),
        encounter=encounter,
        locations=ctx.locations(encounter),
        user=ctx.request.context.get("userId"),
        available=frozenset(n for n, f in data.items() if f.ok),
    )
    facts = FactFinder(rt.mappings, clinical)
    others = _companions(ctx, choice, order, product)
    det = evaluate(policy, product, rt.mappings, facts, order, ctx.today, companions=others)
    failed = {n: f.note for n, f in data.items() if f.status == "failed"}
    record = snapshot(clinical, others, patient=_patient_ref(ctx.request), coverage=choice.reference)
    return _from_determination(replace(job, drug=product.title, record=record), det, failed)


def _clinician(request: HookRequest) -> str | None:
    """The user the hook names, when a Practitioner or PractitionerRole (who signs and answers the form)."""
    user = request.context.get("userId")
    return user if isinstance(user, str) and user.startswith(("Practitioner/", "PractitionerRole/")) else None


def _patient_ref(request: HookRequest) -> str:
    return f"Patient/{request.context.get('patientId')}"


def drug_inputs(rt: Runtime, codings: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """The drug inputs (inputs.yaml kind ``drug``) an order's medication codings map to."""
    return frozenset(
        row.input
        for c in codings
        for row in rt.mappings.lookup(c.get("system"), c.get("code"))
        if rt.mappings.inputs[row.input].kind == "drug"
    )


def _companions(ctx: _Context, choice: CoverageChoice, order: Mapping[str, Any], product: Product) -> list[Any]:
    """The call's other draft MedicationRequests for the same product (both hooks: order-select takes the drafts it
    was not asked about into account, CRD §hook-34): a dose limit per window holds for all of them together."""
    entries = (ctx.request.context.get("draftOrders") or {}).get("entry") or ()
    drafts: list[Mapping[str, Any]] = [
        e["resource"] for e in entries if isinstance(e, Mapping) and isinstance(e.get("resource"), Mapping)
    ]
    others: list[Mapping[str, Any]] = []
    for draft in drafts:
        if draft.get("resourceType") != "MedicationRequest" or draft.get("id") == order.get("id"):
            continue
        medications, _ = _medications(ctx, draft)
        inputs = drug_inputs(ctx.rt, medication_codings(draft, medications, ctx.rt.mappings.product_names))
        match = ctx.rt.policies.find(choice.payer.policies, inputs)
        if match is not None and match[1].id == product.id:
            others.append(draft)
    return others


# the resource types a decision reads from each source (cds.crd.prefetch.SOURCES); other resources there are ignored
SOURCE_TYPES: Mapping[str, tuple[str, ...]] = {
    "patient": ("Patient",),
    "encounter": ("Encounter",),
    "practitioners": ("PractitionerRole", "Practitioner"),
    "conditions": ("Condition",),
    "observations": ("Observation",),
    "medication_history": ("MedicationStatement", "MedicationRequest", "MedicationAdministration"),
    "procedures": ("Procedure",),
}


def _of(fetched: Fetched, *types: str) -> tuple[Mapping[str, Any], ...]:
    return tuple(r for r in fetched.resources if r.get("resourceType") in types)


def _over_limit(det: Determination) -> str:
    """Each dose rule the order exceeds: its id, the policy's words, then what the rule found (the rule's own note:
    the figure the order comes to and the limit, or the kit the weight calls for)."""
    return "; ".join(
        f"{d.id} ({d.rule.text}): {explain.shown(d.note)}" for d in det.doses if d.state.value == "not-met"
    )


def _impossible(det: Determination) -> str:
    """What the order (or the weight) states that no order can mean, e.g. a dose of 0 mcg/kg: the dose rules it leaves
    undecided, as the first thing the reason says (it is what the prescriber has to correct). Empty when none."""
    found = "; ".join(f"{d.id}: {explain.shown(d.note)}" for d in det.doses if d.impossible)
    return (
        f"the order cannot be authorized as written ({found}); correct it and sign again, or it is reviewed; "
        if found
        else ""
    )


def _from_determination(job: _Job, det: Determination, failed: Mapping[str, str]) -> Assessed:
    ctx, stamp = job.ctx, job.stamp
    rt, policy, product = ctx.rt, det.policy, det.product
    billing = coverage_info.billing_codes(rt.mappings, product)
    decision = det.decision
    if decision is Decision.NOT_COVERED:
        info = stamp.info(covered="not-covered", reasons=(Reason(f"{policy.ref}: {explain.failed_text(det)}"),))
        return job.result(info, det)
    if decision is Decision.DOSE_REVIEW:
        why = (
            f"{policy.ref}: {_impossible(det)}the dose exceeds the policy limit and will be reviewed case by case "
            f"({_over_limit(det)})"
        )
        return job.result(
            stamp.info(covered="covered", pa_needed="auth-needed", billing_codes=billing, reasons=(Reason(why),)), det
        )
    if decision is Decision.APPROVED:
        return _approved(job, det, billing)
    questions = open_questions(det, rt.mappings)
    if decision is Decision.REVIEW and product.off_label_review is not None:
        # the use is not one the policy lists; it names the review that decides it: conditional on that review
        review = product.off_label_review
        why = f"{policy.ref}: the use is not one {policy.number} lists; {review.id} {review.text}"
        if not ctx.primary:
            return job.result(
                stamp.info(
                    covered="conditional",
                    pa_needed="auth-needed",
                    info_needed=("OTH",),
                    billing_codes=billing,
                    reasons=(Reason(why),),
                ),
                det,
                questions=questions,
            )
        questionnaire = _publish(rt, det, questions)
        info = stamp.info(
            covered="conditional",
            pa_needed="auth-needed",
            doc_needed="clinical",
            doc_purpose="withpa",
            info_needed=("OTH",),
            billing_codes=billing,
            reasons=(Reason(why),),
            questionnaires=(forms.canonical(questionnaire),),
        )
        return job.result(info, det, questions=questions, questionnaire=questionnaire)
    if not ctx.primary:
        # secondary hooks never ask for clinical documentation (CRD §hook-19): say what signing will need
        wanted = coverage_info.first_text([f"{q.link_id} {q.text}" for q in shown(questions)])
        why = (
            f"{policy.ref}: {_impossible(det)}prior authorization applies; when the order is signed, documentation "
            "will be needed for: "
        )
        return job.result(
            stamp.info(
                covered="covered", pa_needed="auth-needed", billing_codes=billing, reasons=(Reason(why + wanted),)
            ),
            det,
            questions=questions,
        )
    questionnaire = _publish(rt, det, questions)
    draft = forms.draft_response(
        questionnaire,
        questions,
        patient=_patient_ref(ctx.request),
        coverage=job.choice.reference,
        order=f"MedicationRequest/{job.order.get('id')}",
        today=ctx.today,
        base_url=rt.base_url,
        assertion_id=stamp.assertion_id,
        author=_clinician(ctx.request),
    )
    if decision is Decision.DOCUMENTATION and product.documentation is not None:
        why = f"{policy.ref}: the criteria are met; {product.documentation.id} {product.documentation.text}"
    else:
        why = f"{policy.ref}: {_impossible(det)}the record does not settle " + coverage_info.first_text(
            [f"{q.link_id} ({q.text})" for q in shown(questions)], 4
        )
        over = _over_limit(det)
        if over:
            why += f"; the dose also exceeds the limit: {over}"
    technical = tuple(
        Reason(
            f"The {name.replace('_', ' ')} could not be read from the EHR ({note}); the items it "
            "would have settled are asked instead",
            "technical",
        )
        for name, note in failed.items()
    )
    info = stamp.info(
        covered="covered",
        pa_needed="auth-needed",
        doc_needed="clinical",
        doc_purpose="withpa",
        billing_codes=billing,
        reasons=(Reason(why), *technical),
        questionnaires=(forms.canonical(questionnaire),),
    )
    return job.result(
        info,
        det,
        questions=questions,
        questionnaire=questionnaire,
        draft_response=draft,
        client_has_questionnaire=_client_has(ctx, questionnaire),
    )


def _client_has(ctx: _Context, questionnaire: Mapping[str, Any]) -> bool:
    """Whether the EHR already holds the Questionnaire a form-completion card would create (CRD §dev-20: asked
    before offering it, when the client wants form completion and its FHIR server can be queried)."""
    if ctx.option(OPTION_FORM_COMPLETION, False) is not True or ctx.source.client is None:
        return False
    query = urlencode({"url": questionnaire["url"], "version": questionnaire["version"]})
    found = ctx.source.search(f"Questionnaire?{query}")
    return any(r.get("resourceType") == "Questionnaire" for r in found.resources)


def _publish(rt: Runtime, det: Determination, questions: tuple[Question, ...]) -> dict[str, Any]:
    return publish(rt, det.policy, det.product, questions)


def _approved(job: _Job, det: Determination, billing: tuple[Mapping[str, str], ...]) -> Assessed:
    ctx, stamp = job.ctx, job.stamp
    rt, policy, product = ctx.rt, det.policy, det.product
    met = det.chosen.indication if det.chosen else None
    basis = f"{policy.ref}: {met.id} {met.title}, every criterion met" if met else f"{policy.ref}: criteria met"
    if not ctx.primary or not ctx.option(OPTION_UNSOLICITED, True):
        when = "when the order is signed" if not ctx.primary else "on request (this call asked for no determination)"
        return job.result(
            stamp.info(
                covered="covered",
                pa_needed="auth-needed",
                billing_codes=billing,
                reasons=(Reason(f"{basis}; the prior authorization is issued {when}"),),
            ),
            det,
        )
    issued = authorizations.issue(rt, det, job.choice.payer.id, job.patient_key, stamp.assertion_id)
    reason = Reason(
        f"{basis}; prior authorization {issued.pa_id} {authorizations.until(issued)} ({product.authorization.id})"
    )
    info = stamp.info(
        covered="covered", pa_needed="satisfied", satisfied_pa_id=issued.pa_id, billing_codes=billing, reasons=(reason,)
    )
    return job.result(info, det, prior_auth=issued)


def _finish(ctx: _Context, assessed: Assessed) -> Assessed:
    """Mark an order whose incoming coverage-information already says the same, about the same order (CRD §resp-29,
    §resp-35). "The same order" is read from the stored trace: it holds every criterion and the dose the order
    came to, so a changed dose with the same answer is new information (a new assertion for the order as it is)."""
    new = assessed.extension
    for old in coverage_info.existing(assessed.order):
        if coverage_info.same_assertion(old, new):
            old_id = (coverage_info.values(old, "coverage-assertion-id") or [None])[0]
            stored = ctx.rt.store.assertion(old_id) if isinstance(old_id, str) else None
            if stored is not None and _same_trace(stored.trace, _trace(assessed)):
                return replace(assessed, unchanged=True)
    return assessed


def _trace(a: Assessed) -> Any:
    det = a.determination
    return explain.trace(det) if det else {"decision": "no-policy", "notes": list(a.notes)}


def _same_trace(stored: Any, new: Any) -> bool:
    """Whether two traces describe the same evaluation (their dates aside: a re-sign on another day is not news)."""

    def comparable(trace: Any) -> Any:
        plain = json.loads(json.dumps(trace))
        return {k: v for k, v in plain.items() if k != "date"} if isinstance(plain, dict) else plain

    return bool(comparable(stored) == comparable(new))
