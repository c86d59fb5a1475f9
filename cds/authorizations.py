"""Issuing a prior authorization when a determination is approved: one PA per reuse key, stored as it is issued.

Shared by CRD (an order-sign whose record meets the policy), DTR (answers that meet it) and PAS (the request).
"""

from __future__ import annotations

import calendar
from datetime import date, timedelta

from cds.runtime import Runtime
from cds.store import PriorAuth
from policies.engine import Determination


def issue(rt: Runtime, det: Determination, payer_id: str, patient_key: str, assertion_id: str) -> PriorAuth:
    """The authorization for an approved determination. The reuse key is the payer, the patient under this Coverage
    (``patient_key``), the product and policy|version: an active one valid today is reused, else a new one is stored
    now, so that calls racing to approve one order answer with one PA id (:meth:`Store.issue_prior_auth`)."""
    today = det.today
    policy, product = det.policy, det.product
    issued = rt.store.active_prior_auth(payer_id, patient_key, product.id, policy.ref, today)
    if issued is not None:
        return issued
    candidate = PriorAuth(
        rt.new_pa_id(),
        assertion_id,
        payer_id,
        patient_key,
        product.id,
        policy.ref,
        today,
        valid_to(today, det),
        product.authorization.doses,
    )
    return rt.store.issue_prior_auth(candidate, today)


def until(pa: PriorAuth) -> str:
    if pa.valid_to:
        return f"valid through {pa.valid_to.isoformat()}"
    return f"valid for {pa.doses} dose(s)" if pa.doses else "valid"


def valid_to(today: date, det: Determination) -> date | None:
    """The last day of an authorization: days or months from today (None: valid for its doses)."""
    if det.authorization_days:
        return today + timedelta(days=det.authorization_days - 1)  # the day of signing is the first
    return add_months(today, det.authorization_months) if det.authorization_months else None


def add_months(start: date, months: int) -> date:
    month = start.month - 1 + months
    year, month = start.year + month // 12, month % 12 + 1
    return date(year, month, min(start.day, calendar.monthrange(year, month)[1]))
