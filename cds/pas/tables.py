"""The PAS tables, on the store's one ``metadata`` (migration 0003 creates them; tests/test_migrations.py checks that
the migrations and these definitions agree).

``pas_requests`` holds one row per accepted PAS request Bundle (a Claim update is a row of its own, ``related_to``
the request it updates, and the updated one gets ``superseded_by``); the database enforces one row per submitter and
``Bundle.identifier`` (a retry reads the stored response back). ``pas_decisions`` records every reviewer decision and
``audit_events`` every submission, inquiry, decision and notification. Patient data lives here, never in logs.
"""

from __future__ import annotations

from sqlalchemy import Column, Date, DateTime, Float, Index, Integer, String, Table, Text, UniqueConstraint

from cds.store import metadata

pas_requests = Table(
    "pas_requests",
    metadata,
    Column("id", String(64), primary_key=True),  # our ClaimResponse id
    Column("submitter", String(512), nullable=False),  # the verified client id, or "unauthenticated"
    Column("bundle_key", String(1024), nullable=False),  # Bundle.identifier system|value
    Column("claim_key", String(1024), nullable=False),  # Claim.identifier[0] system|value
    Column("patient_key", String(128), nullable=False),  # the CRD assertion's patient_key, else a hash of the member
    Column("payer_id", String(64), nullable=False),
    Column("member_id", String(256), nullable=False),  # the Coverage's member id (inquiry matching)
    Column("provider_key", String(512), nullable=False),  # the requestor's NPI (or first identifier) system|value
    Column("org_identifier", String(256), nullable=False),  # the sending system (ISA06), else the provider's id
    Column("status", String(16), nullable=False),  # pended | certified | denied | modified | cancelled | partial
    Column("priority", String(16), nullable=False),  # expedited | standard
    Column("drug", String(256), nullable=False),  # what the items ask for, for the reviewer's queue
    Column("policy", String(128), nullable=False),  # policy|version the items were evaluated under ("" for none)
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("due_at", DateTime(timezone=True), nullable=False),  # CMS-0057-F: 72 h expedited, 7 days standard
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("related_to", String(64)),  # the request a Claim update updates
    Column("superseded_by", String(64)),  # the update that replaced this request (not current any more)
    Column("request", Text, nullable=False),  # the request Bundle (JSON)
    Column("response", Text, nullable=False),  # the current response Bundle (JSON)
    Column("explanation", Text, nullable=False),  # per item: decision, criteria rows, evidence, answers, documents
    UniqueConstraint("submitter", "bundle_key", name="ux_pas_request_bundle"),
    Index("ix_pas_request_inquiry", "payer_id", "member_id", "provider_key"),
    Index("ix_pas_request_queue", "status", "due_at"),
    Index("ix_pas_request_claim", "submitter", "claim_key"),
)

pas_decisions = Table(
    "pas_decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("reviewer", String(256), nullable=False),
    Column("action", String(16), nullable=False),  # approve | modify | deny
    Column("reason", Text),
    Column("period_end", Date),
    Column("quantity", Float),
    Column("decided_at", DateTime(timezone=True), nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False, index=True),  # submit | inquire | decision | notification | ...
    Column("actor", String(512), nullable=False),
    Column("subject", String(128)),  # the request id it is about
    Column("at", DateTime(timezone=True), nullable=False),
    Column("detail", Text, nullable=False),  # JSON
)
