"""The hook services. Discovery and the routes are both built from :func:`services`."""

from __future__ import annotations

from collections.abc import Mapping

from cds.crd.hooks import order_select, order_sign
from cds.crd.registry import ServiceDefinition


def services(prefetch: Mapping[str, str]) -> tuple[ServiceDefinition, ...]:
    templates = dict(prefetch)
    return (order_sign.service(templates), order_select.service(templates))
