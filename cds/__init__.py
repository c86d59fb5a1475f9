"""Payer-side prior-authorization service: CDS Hooks 2.0 with Da Vinci CRD, on FHIR R4.

The application factory lives in :mod:`cds.app`; importing this package (or :mod:`cds.errors`) pulls in no web
framework, so the pure core (``fhir_mappings``, ``policies``) stays free of Flask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["create_app"]


def create_app(config: Any = None, **kwargs: Any) -> Flask:
    """Build the Flask application (see :func:`cds.app.create_app`)."""
    from cds.app import create_app as _create_app

    return _create_app(config, **kwargs)
