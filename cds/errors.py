"""Every error this service raises, and the one shape they are rendered in.

Hierarchy::

    CdsError                    500 exception      something we did not foresee (never the client's fault)
    ├── ConfigError             startup            bad setting; message names the file or variable
    ├── LoadError               startup            bad policy or mapping data; message is "file: place: problem"
    │   ├── PolicyLoadError
    │   └── MappingLoadError
    ├── ClientError             400 invalid        the request is wrong; the message says how
    │   ├── MalformedJson       400 structure      body is not JSON / not an object
    │   ├── InvalidRequest      400 required       CDS Hooks shape: missing hook, context, draftOrders ...
    │   ├── InvalidResource     400 structure      a FHIR resource fails R4 validation or has the wrong type
    │   ├── TooLong             400 too-long       a list or value over a documented limit (feedback items, ids)
    │   ├── CoverageProblem     400 business-rule  no usable Coverage, several, or a payer we do not serve
    │   ├── UnsupportedVersion  422 not-supported  davinci-crd.requestedVersion we do not implement
    │   ├── UnsupportedMedia    415 not-supported  body is not application/json
    │   ├── NotFound            404 not-found      unknown service, resource or route
    │   ├── MethodNotAllowed    405 not-supported
    │   ├── Forbidden           403 forbidden      an access token without the scope needed; an expired form link
    │   └── OAuthError          400/401            a SMART token request refused (RFC 6749 §5.2 error code)
    ├── Unauthorized            401 login          JWT or access token missing or rejected; no detail is ever given
    └── DataUnavailable         412 processing     prefetch missing and the FHIR server cannot be queried

Both the CDS Hooks endpoints and the FHIR endpoints answer errors with a FHIR ``OperationOutcome`` (CDS Hooks 3.0
"Returning OperationOutcome"); :func:`to_operation_outcome` is the only renderer. The one exception is the OAuth token
endpoint (``POST /auth/token``), whose errors RFC 6749 §5.2 shapes: :func:`to_oauth_error` renders an
:class:`OAuthError` there.
"""

from __future__ import annotations

from typing import Any

HTTP_ISSUE_CODES = {
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    413: "too-long",
    414: "too-long",
    431: "too-long",
    501: "not-supported",
}


class CdsError(Exception):
    http_status = 500
    issue_code = "exception"

    def __init__(self, message: str = "Internal error", *, expression: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression


class ConfigError(CdsError):
    pass


class LoadError(CdsError):
    def __init__(self, file: str, place: str, problem: str) -> None:
        super().__init__(f"{file}: {place}: {problem}")
        self.file = file
        self.place = place
        self.problem = problem


class PolicyLoadError(LoadError):
    pass


class MappingLoadError(LoadError):
    pass


class ClientError(CdsError):
    http_status = 400
    issue_code = "invalid"


class MalformedJson(ClientError):
    issue_code = "structure"


class InvalidRequest(ClientError):
    issue_code = "required"


class InvalidResource(ClientError):
    issue_code = "structure"


class TooLong(ClientError):
    issue_code = "too-long"


class CoverageProblem(ClientError):
    issue_code = "business-rule"


class UnsupportedVersion(ClientError):
    http_status = 422
    issue_code = "not-supported"


class UnsupportedMedia(ClientError):
    http_status = 415
    issue_code = "not-supported"


class NotFound(ClientError):
    http_status = 404
    issue_code = "not-found"


class Conflict(ClientError):
    """The request is sound, but the resource it acts on has moved on (settled already, superseded)."""

    http_status = 409
    issue_code = "conflict"


class BusinessRule(ClientError):
    """The request is well formed but breaks a rule of the operation (another patient's answers, another Coverage)."""

    http_status = 422
    issue_code = "business-rule"


class MethodNotAllowed(ClientError):
    http_status = 405
    issue_code = "not-supported"


class Forbidden(ClientError):
    http_status = 403
    issue_code = "forbidden"


class OAuthError(ClientError):
    """A token request refused: ``error`` is the RFC 6749 §5.2 code (``invalid_request``, ``invalid_client``,
    ``invalid_grant``, ``invalid_scope``, ``unsupported_grant_type``); the message is the ``error_description`` and
    never quotes the client assertion. ``reason`` (tests, logs through logsafe) is never sent."""

    def __init__(self, error: str, description: str, *, status: int = 400, reason: str = "") -> None:
        super().__init__(description)
        self.error = error
        self.http_status = status
        self.reason = reason


class Unauthorized(CdsError):
    http_status = 401
    issue_code = "login"

    def __init__(self, reason: str = "") -> None:
        # the reason is kept for tests and never rendered (CDS Hooks best practice: 401 with no detail)
        super().__init__("Unauthorized")
        self.reason = reason


class DataUnavailable(CdsError):
    http_status = 412
    issue_code = "processing"


def status_error(status: int, message: str) -> CdsError:
    """An error answered with an HTTP status chosen outside this code (werkzeug routing and limits, gunicorn's
    parser), as a :class:`CdsError` so it is rendered like every other."""
    err = NotFound(message) if status == 404 else CdsError(message)
    err.http_status = status
    err.issue_code = HTTP_ISSUE_CODES.get(status, "invalid" if status < 500 else "exception")
    return err


def to_operation_outcome(error: CdsError) -> dict[str, Any]:
    """Render any :class:`CdsError` as an R4 OperationOutcome (the body of every error response)."""
    issue: dict[str, Any] = {
        "severity": "error" if error.http_status < 500 else "fatal",
        "code": error.issue_code,
        "details": {"text": error.message},
    }
    if error.expression:
        issue["expression"] = [error.expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def to_oauth_error(error: OAuthError) -> dict[str, str]:
    """Render an :class:`OAuthError` as the token endpoint's error body (RFC 6749 §5.2)."""
    return {"error": error.error, "error_description": error.message}
