"""Prometheus metrics: ``GET /metrics`` in the text exposition format, and what the service counts.

Every label value comes from a closed set: the route is the URL rule's template (``/fhir/QuestionnaireResponse/
<assertion_id>``, never the path a client sent, nor its query), the method one of :data:`METHODS`, a policy an id
of a loaded policy, an outcome a code of the standard's value set, a resource type one of :data:`RESOURCE_TYPES`. No
patient data, no identifier, no token reaches a label.

What is counted where it happens (module-level objects, one set per process):

* every request: ``cds_http_requests_total`` and ``cds_http_request_duration_seconds`` by route, method and status,
  ``cds_http_requests_in_progress`` (:func:`register` adds the hooks);
* every determination: ``cds_decisions_total`` by standard (crd, dtr, pas), policy and outcome (:func:`decided`,
  :func:`crd_decided`), and a reviewer's decision ``cds_review_decisions_total`` (:func:`reviewed`);
* every EHR query: ``cds_ehr_query_duration_seconds`` by resource type and outcome, and
  ``cds_ehr_query_failures_total`` by resource type and reason (:func:`ehr_query`).

What the store holds is read when scraped (:class:`StoreCollector`: a few COUNT queries), so whichever worker answers
says the same: the PAS notification outbox (pending, given up, the oldest pending one's age), the reviewer queue
and how much of it is overdue, by priority.

Under ``cds serve`` the gunicorn workers share their counts through prometheus-client's multiprocess mode: the
master makes a fresh directory and names it in ``PROMETHEUS_MULTIPROC_DIR`` before it forks
(:func:`prepare_multiprocess`, from :mod:`cds.server`), each worker writes its own files there, a scrape adds them
up, and a worker that exits is marked dead (:func:`process_exited`). prometheus-client picks its storage when it is
first imported, so this module imports it only when a metric is first used (after the fork under gunicorn); in one
process (tests, ``create_app``) the metrics live in a plain registry.
"""

from __future__ import annotations

import atexit
import hmac
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, g, request
from sqlalchemy import and_, case, func, select

from cds.errors import NotFound, Unauthorized

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from cds.config import Config
    from cds.runtime import Runtime

bp = Blueprint("metrics", __name__)

# the text format every Prometheus reads (the names here are all legacy-valid, so the body is the same as 1.0.0's)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "(unmatched)"  # the route label of a request no URL rule matched (404, 405)
UNPARSED = "(unparsed)"  # ... and of one gunicorn refused before the app saw it (414, 431, 400)
NONE = "(none)"  # the policy label of a determination no policy made (no policy for the drug)
OTHER = "other"
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# what the service reads from an EHR (cds.crd.prefetch templates, references it follows); anything else is "other"
RESOURCE_TYPES = frozenset(
    (
        "Patient",
        "Encounter",
        "Coverage",
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Condition",
        "Observation",
        "Medication",
        "MedicationStatement",
        "MedicationRequest",
        "MedicationAdministration",
        "Procedure",
        "Location",
        "Questionnaire",
    )
)
# coverage-information codes (Da Vinci CRD): covered, and pa-needed
CRD_COVERED = frozenset(("covered", "not-covered", "conditional", "indeterminate"))
CRD_PA_NEEDED = frozenset(("no-auth", "auth-needed", "satisfied", "performpa", "conditional", "indeterminate"))
PAS_CODES = frozenset(("A1", "A2", "A3", "A4", "A6", "C"))  # X12 306 review actions, and cancelled
STANDARDS = frozenset(("crd", "dtr", "pas"))

# Request latency: the service answers in 2-15 ms at p99 but a call waiting on the EHR takes up to its deadline
# (fhir_total_timeout, 3 s by default), so fine buckets low down and a few up to 10 s.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# EHR reads: tens of milliseconds on a good day, up to the read timeout (1.5 s) and the call's deadline (3 s).
EHR_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class _Metrics:
    """The metric objects of this process (made on first use, see the module's docstring)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: they double the output and no dashboard reads them
        self.registry = CollectorRegistry(auto_describe=True)
        self.children: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # per (route, method, status)
        reg = self.registry
        http = ("route", "method", "status")
        self.requests = Counter("cds_http_requests", "HTTP requests answered.", http, registry=reg)
        self.duration = Histogram(
            "cds_http_request_duration_seconds",
            "Time from the request's arrival in the app to its response.",
            http,
            buckets=HTTP_BUCKETS,
            registry=reg,
        )
        self.in_progress = Gauge(
            "cds_http_requests_in_progress",
            "Requests being answered now (summed over the live workers).",
            multiprocess_mode="livesum",
            registry=reg,
        )
        self.decisions = Counter(
            "cds_decisions",
            "Determinations the service made: per order (CRD), settled form (DTR) or claim item (PAS).",
            ("standard", "policy", "outcome"),
            registry=reg,
        )
        self.reviews = Counter(
            "cds_review_decisions",
            "Reviewer decisions on pended PAS items (A1 approved, A6 modified, A3 denied).",
            ("policy", "outcome"),
            registry=reg,
        )
        ehr = ("resource_type", "outcome")
        self.ehr = Histogram(
            "cds_ehr_query_duration_seconds",
            "EHR FHIR queries (a search with its pages, or a read) by outcome: ok, failed, busy (no EHR slot free).",
            ehr,
            buckets=EHR_BUCKETS,
            registry=reg,
        )
        self.ehr_failures = Counter(
            "cds_ehr_query_failures",
            "EHR FHIR queries that failed: timeout (the call's deadline), error (unreachable, refused, not FHIR), "
            "busy (no EHR slot free).",
            ("resource_type", "reason"),
            registry=reg,
        )


_lock = threading.Lock()
_metrics: _Metrics | None = None
_multiproc_dir: str | None = None  # set in the gunicorn master by prepare_multiprocess, inherited by the workers


def _m() -> _Metrics:
    global _metrics
    found = _metrics
    if found is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
            found = _metrics
    return found


# --- what is counted -------------------------------------------------------------------------------------------------


def _policy(policy: str | None) -> str:
    """The policy label: a loaded policy's id (a ``policy|version`` ref loses its version), or (none)."""
    return policy.split("|", 1)[0] if policy else NONE


def coverage_outcome(covered: str | None, pa_needed: str | None) -> str:
    """The outcome label of a CRD/DTR determination: ``covered:satisfied``, ``not-covered``, ``conditional:auth-
    needed`` (coverage-information's ``covered``, then its ``pa-needed`` when there is one)."""
    if covered not in CRD_COVERED:
        return OTHER
    if not pa_needed:
        return str(covered)
    return f"{covered}:{pa_needed if pa_needed in CRD_PA_NEEDED else OTHER}"


def decided(standard: str, policy: str | None, outcome: str) -> None:
    """One determination (``outcome`` from a closed set: :func:`coverage_outcome`, or a PAS review action code)."""
    if standard not in STANDARDS:
        raise ValueError(f"unknown standard {standard!r}")
    _m().decisions.labels(standard, _policy(policy), outcome).inc()


def crd_decided(assessment: Any) -> None:
    """Every order of a CRD hook call's assessment (:class:`cds.crd.assess.Assessment`)."""
    for a in assessment.orders:
        det = a.determination
        decided("crd", det.policy.id if det else None, coverage_outcome(a.info.covered, a.info.pa_needed))


def pas_decided(items: Any) -> None:
    """Every item state of a stored PAS submission (:func:`cds.pas.decide.decide_item`): A1, A4 or C."""
    for state in items:
        code = str(state.get("code"))
        decided("pas", state.get("policy") or None, code if code in PAS_CODES else OTHER)


def reviewed(before: Any, after: Any) -> None:
    """A reviewer's decision: every item it changed from pended (A4) to A1, A6 or A3."""
    was = {s.get("sequence"): s.get("code") for s in before}
    for state in after:
        code = str(state.get("code"))
        if was.get(state.get("sequence")) == "A4" and code != "A4":
            _m().reviews.labels(_policy(state.get("policy") or None), code if code in PAS_CODES else OTHER).inc()


def resource_type(relative: str) -> str:
    """The resource type of a FHIR query (``Condition?patient=...``, ``Practitioner/12``, an absolute URL), or
    ``other``: never anything after the type (ids, query), never the server."""
    path = relative.split("?", 1)[0]
    if "://" in path:
        return OTHER  # a next link: counted as part of the search it continues, never parsed
    head = path.split("/", 1)[0]
    return head if head in RESOURCE_TYPES else OTHER


def ehr_query(relative: str, seconds: float, outcome: str, reason: str | None = None) -> None:
    """One EHR query: ``outcome`` ok | failed | busy; ``reason`` of a failure timeout | error | busy."""
    rtype = resource_type(relative)
    m = _m()
    m.ehr.labels(rtype, outcome).observe(seconds)
    if outcome != "ok":
        m.ehr_failures.labels(rtype, reason or outcome).inc()


# --- the request hooks -----------------------------------------------------------------------------------------------


def route_label() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED


def _started() -> None:
    g.cds_metrics_started = time.perf_counter()
    _m().in_progress.inc()


def _answered(resp: Response) -> Response:
    started = g.pop("cds_metrics_started", None)
    if started is not None:
        m = _m()
        method = request.method if request.method in METHODS else OTHER
        labels = (route_label(), method, resp.status_code)
        children = m.children.get(labels)
        if children is None:  # labels() costs a lookup and a lock; the set of (route, method, status) is small
            children = m.children[labels] = (m.requests.labels(*labels), m.duration.labels(*labels))
        children[0].inc()
        children[1].observe(time.perf_counter() - started)
        m.in_progress.dec()
        g.cds_metrics_done = True
    return resp


def refused(status: int, seconds: float) -> None:
    """A request gunicorn refused before the app saw it (:mod:`cds.server`): route ``(unparsed)``, method other."""
    m = _m()
    labels = (UNPARSED, OTHER, str(status))
    m.requests.labels(*labels).inc()
    m.duration.labels(*labels).observe(seconds)


def _torn_down(_exc: BaseException | None) -> None:
    # a request whose response hooks did not run (an error inside one) still leaves the in-progress gauge
    if not g.pop("cds_metrics_done", False) and g.pop("cds_metrics_started", None) is not None:
        _m().in_progress.dec()


def register(app: Flask) -> None:
    """Count every request of ``app`` (register before the other hooks, so that a request refused by one of them is
    counted too) and serve ``GET /metrics``; nothing when ``metrics`` is off."""
    if not app.extensions["cds"].config["metrics"]:
        return
    app.before_request(_started)
    app.after_request(_answered)
    app.teardown_request(_torn_down)
    app.register_blueprint(bp)


# --- the scrape ------------------------------------------------------------------------------------------------------


def _authorize(rt: Runtime) -> None:
    token = str(rt.config["metrics_token"])
    if not token:
        return
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise Unauthorized("no or wrong metrics token")


@bp.get("/metrics")
def scrape() -> Response:
    """The metrics in Prometheus' text format (``metrics_token`` set: only with ``Authorization: Bearer`` it)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from cds.runtime import current  # not at the top: cds.runtime imports what imports this module

    rt = current()
    if not rt.config["metrics"]:
        raise NotFound("No such route")
    _authorize(rt)
    registry = CollectorRegistry(auto_describe=False)
    if _multiproc_dir is not None:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry, path=_multiproc_dir)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Forward(_m().registry))
    registry.register(StoreCollector(rt))
    resp = Response(generate_latest(registry), content_type=CONTENT_TYPE)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.after_request
def _challenge(resp: Response) -> Response:
    if resp.status_code == 401:  # only /metrics is here
        resp.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return resp


class _Forward:
    """This process's registry, as a collector of the scrape's registry (single-process mode)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class StoreCollector:
    """Gauges read from the store when scraped: the notification outbox and the reviewer queue (COUNT queries on
    indexed columns). A store that does not answer gives ``cds_store_up 0`` and no gauges, never a failed scrape."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            outbox, queue = self._read()
        except Exception:  # the store is away: say so, and let the rest of the scrape through
            yield GaugeMetricFamily("cds_store_up", "Whether the store answered the scrape's queries.", value=0)
            return
        yield GaugeMetricFamily("cds_store_up", "Whether the store answered the scrape's queries.", value=1)
        notes = GaugeMetricFamily(
            "cds_outbox_notifications",
            "PAS notifications not delivered: pending (to be tried) or given up (attempts used up, or the "
            "subscription off).",
            labels=("state",),
        )
        notes.add_metric(("pending",), outbox["pending"])
        notes.add_metric(("given_up",), outbox["given_up"])
        yield notes
        yield GaugeMetricFamily(
            "cds_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending notification (0 when none is pending).",
            value=outbox["oldest_age"],
        )
        size = GaugeMetricFamily(
            "cds_review_queue_requests",
            "PAS requests waiting for a reviewer (pended or partly pended).",
            labels=["priority"],
        )
        overdue = GaugeMetricFamily(
            "cds_review_queue_overdue_requests",
            "PAS requests waiting for a reviewer past their due time (72 h expedited, 7 days standard).",
            labels=["priority"],
        )
        for priority in ("expedited", "standard"):
            size.add_metric((priority,), queue.get(priority, (0, 0))[0])
            overdue.add_metric((priority,), queue.get(priority, (0, 0))[1])
        yield size
        yield overdue
        policies = GaugeMetricFamily(
            "cds_policy_info", "The policies loaded, by id and version.", labels=["policy", "version"]
        )
        for policy in self.rt.policies.policies.values():
            policies.add_metric((policy.id, policy.version), 1)
        yield policies

    def _read(self) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
        from cds.pas.notify import outbox
        from cds.pas.store import OPEN
        from cds.pas.tables import pas_requests

        now = self.rt.clock()
        pending = outbox.c.next_attempt_at.is_not(None)
        with self.rt.store.engine.connect() as conn:
            row = conn.execute(
                select(
                    func.count(case((pending, 1))),
                    func.count(case((outbox.c.next_attempt_at.is_(None), 1))),
                    func.min(case((pending, outbox.c.created_at))),
                ).where(outbox.c.delivered_at.is_(None))
            ).one()
            rows = conn.execute(
                select(pas_requests.c.priority, func.count(), func.count(case((pas_requests.c.due_at < now, 1))))
                .where(and_(pas_requests.c.status.in_(OPEN), pas_requests.c.superseded_by.is_(None)))
                .group_by(pas_requests.c.priority)
            ).all()
        oldest = _aware(row[2])
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        out = {"pending": float(row[0]), "given_up": float(row[1]), "oldest_age": age}
        return out, {str(p): (int(n), int(late)) for p, n, late in rows}


# --- several processes (cds serve) -----------------------------------------------------------------------------------


def prepare_multiprocess(config: Config) -> str | None:
    """In the gunicorn master, before it forks: a fresh, empty directory for the workers' metric files, named in
    ``PROMETHEUS_MULTIPROC_DIR`` (a directory already named there is used, emptied of its ``*.db`` files first;
    else a new temporary one, removed when the master exits). None when ``metrics`` is off.

    :raise RuntimeError: prometheus-client was imported before (its storage is chosen then, per process).
    """
    global _multiproc_dir
    if not config["metrics"]:
        return None
    if "prometheus_client" in sys.modules and _multiproc_dir is None:
        raise RuntimeError("prometheus_client was imported before cds serve could set PROMETHEUS_MULTIPROC_DIR")
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.remove(os.path.join(given, name))
        path = given
    else:
        path = tempfile.mkdtemp(prefix="cds-metrics-")
        master = os.getpid()

        def remove() -> None:
            if os.getpid() == master:  # workers run atexit too, and must not remove it under the others
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    _multiproc_dir = path
    return path


def process_exited(pid: int) -> None:
    """gunicorn's ``child_exit``: the worker's live gauges (requests in progress) no longer count."""
    if _multiproc_dir is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, _multiproc_dir)  # type: ignore[no-untyped-call]
