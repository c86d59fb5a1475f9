"""Reading from servers we do not control (an EHR's FHIR server, a client's JWK Set): a hard deadline, a size cap.

A socket timeout bounds each ``recv``, not a response: a server that drips one byte a second never trips it. So a
:class:`Reader` keeps every connection it opens and a timer cuts them (``shutdown``) when the deadline passes,
whatever phase the read is in (connecting, the status line, headers, body). Bodies are streamed, refused when they
declare or reach more than ``max_bytes``, and never decompressed (``Accept-Encoding: identity``, anything else is
refused), so a response cannot make the service hold more than the cap.

Which servers may be read at all is decided by the caller (:func:`same_server`, :func:`allowed`). Where the caller
does not choose the server (a subscriber's endpoint), a :func:`destination_policy` decides which addresses may be
connected to: the adapter resolves the name itself and connects only to an allowed address, so a name that resolves
to an internal one (or starts to, between two requests) reaches nothing.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection

DEFAULT_PORTS = {"http": 80, "https": 443}


class UpstreamError(Exception):
    """The read failed: unreachable, too slow, too large, or refused. The message is safe to show (no token)."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str


AddressPolicy = Callable[[str], bool]  # an IP address (text) → may it be connected to


class DestinationRefused(NewConnectionError):
    """Every address the destination's name resolves to is outside the :func:`destination_policy`."""


def destination_policy(networks: Iterable[str]) -> AddressPolicy:
    """Global unicast addresses, and those in ``networks`` (CIDR, e.g. ``127.0.0.0/8``); never private, link-local
    (cloud metadata), shared, reserved, multicast or unspecified ones outside them. An IPv4-mapped IPv6 address is
    judged as its IPv4 address. :raise ValueError: a network that is not CIDR."""
    extra = [ipaddress.ip_network(n, strict=False) for n in networks]

    def allowed(text: str) -> bool:
        try:
            address = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address.version == net.version and address in net for net in extra):
            return True
        return address.is_global and not address.is_multicast

    return allowed


def _guarded(base: type[HTTPConnection], allowed: AddressPolicy) -> type[HTTPConnection]:
    class Guarded(base):  # type: ignore[valid-type, misc]
        def _new_conn(self) -> socket.socket:
            """Resolve the name here and connect to an allowed address only (TLS still checks the name)."""
            try:
                infos = socket.getaddrinfo(self._dns_host, self.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise NameResolutionError(self.host, self, exc) from exc
            fit = list(dict.fromkeys(str(info[4][0]) for info in infos if allowed(str(info[4][0]))))
            if not fit:
                raise DestinationRefused(self, "the destination's address is not one this service may connect to")
            failure: OSError | None = None
            for address in fit:
                try:
                    return connection.create_connection(
                        (address, self.port),
                        self.timeout,
                        source_address=self.source_address,
                        socket_options=self.socket_options,
                    )
                except TimeoutError as exc:
                    raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from exc
                except OSError as exc:
                    failure = exc
            raise NewConnectionError(self, f"Failed to establish a new connection: {failure}")

    return Guarded


def _tracked(
    base: type[HTTPConnectionPool],
    conn_cls: type[HTTPConnection],
    seen: weakref.WeakSet[Any],
    allowed: AddressPolicy | None,
) -> type[HTTPConnectionPool]:
    class Tracked(base):  # type: ignore[valid-type, misc]
        ConnectionCls = conn_cls if allowed is None else _guarded(conn_cls, allowed)

        def _get_conn(self, timeout: float | None = None) -> Any:
            conn = super()._get_conn(timeout)
            seen.add(conn)
            return conn

    return Tracked


class CuttableAdapter(HTTPAdapter):
    """An adapter that remembers the connections it hands out, so that :meth:`cut` can end reads in flight; with
    ``allowed``, it connects only to the addresses that policy allows (:func:`destination_policy`)."""

    def __init__(self, allowed: AddressPolicy | None = None) -> None:
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self.allowed = allowed
        super().__init__(pool_connections=2, pool_maxsize=8, max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _tracked(HTTPConnectionPool, HTTPConnection, self.connections, self.allowed),
            "https": _tracked(HTTPSConnectionPool, HTTPSConnection, self.connections, self.allowed),
        }

    def cut(self) -> None:
        for conn in list(self.connections):
            sock = getattr(conn, "sock", None)
            if sock is None:
                continue
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
            except OSError:
                pass


class Reader:
    """GETs within one deadline shared by every read made through this reader (several threads may use it)."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        budget_seconds: float,
        max_bytes: int,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.deadline = time.monotonic() + budget_seconds
        self.max_bytes = max_bytes
        self._headers = {"Accept-Encoding": "identity", **(headers or {})}
        self._adapter: CuttableAdapter | None = None
        self._session: requests.Session | None = None  # made on the first read: most calls read nothing
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._expired = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _connect(self) -> requests.Session:
        with self._lock:
            if self._session is None:
                self._adapter = CuttableAdapter()
                self._session = requests.Session()
                self._session.mount("http://", self._adapter)
                self._session.mount("https://", self._adapter)
                self._session.headers.update(self._headers)
            return self._session

    def _arm(self) -> None:
        with self._lock:
            if self._timer is None and not self._expired:
                self._timer = threading.Timer(max(0.0, self.remaining()), self._expire)
                self._timer.daemon = True
                self._timer.start()

    def _expire(self) -> None:
        self._expired = True
        if self._adapter is not None:
            self._adapter.cut()

    def get(self, url: str, headers: Mapping[str, str] | None = None) -> Answer:
        left = self.remaining()
        if left <= 0 or self._expired:
            raise UpstreamError("the time allowed for reading it was used up")
        session = self._connect()
        self._arm()
        try:
            resp = session.get(
                url,
                headers=dict(headers or {}),
                timeout=(min(self.connect_timeout, left), min(self.read_timeout, left)),
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout:
            raise UpstreamError("it did not answer in time") from None
        except requests.RequestException as exc:
            if self._expired:
                raise UpstreamError("it did not answer within the time allowed") from None
            raise UpstreamError(f"it could not be reached ({exc.__class__.__name__})") from None
        try:
            return Answer(resp.status_code, self._body(resp), resp.headers.get("Content-Type", ""))
        finally:
            resp.close()

    def _body(self, resp: requests.Response) -> bytes:
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UpstreamError(f"it answered with Content-Encoding {encoding[:20]!r}, which is not read")
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise UpstreamError(f"its answer is larger than {self.max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = resp.raw.read1(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise UpstreamError(f"its answer is larger than {self.max_bytes} bytes")
                if self.remaining() <= 0:
                    raise UpstreamError("it did not answer within the time allowed")
                chunks.append(chunk)
        except UpstreamError:
            raise
        except Exception as exc:  # the socket cut at the deadline, or urllib3's ProtocolError / ReadTimeoutError
            if self._expired:
                raise UpstreamError("it did not answer within the time allowed") from None
            raise UpstreamError(f"its answer could not be read ({exc.__class__.__name__})") from None
        if self._expired:
            raise UpstreamError("it did not answer within the time allowed")
        return b"".join(chunks)

    def close(self) -> None:
        with self._lock:
            self._expired = True  # nothing more is read through this reader
            if self._timer is not None:
                self._timer.cancel()
            session = self._session
        if session is not None:
            session.close()


# --- which servers ---------------------------------------------------------------------------------------------------
def _origin(url: str) -> tuple[str, str, int | None, list[str]] | None:
    """(scheme, host, port, path segments) of an http(s) URL, or None when it is not one we would ever call."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    segments = [s for s in parts.path.split("/") if s]
    if any(unquote(s) in (".", "..") for s in segments):
        return None
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme], segments


def same_server(base: str, url: str) -> bool:
    """Whether ``url`` lies on the FHIR server ``base``: same scheme, host and port, and under its path, segment by
    segment (``…/fhirEVIL/…`` is not under ``…/fhir``; ``ehr.example.attacker.net`` is not ``ehr.example``)."""
    b, u = _origin(base), _origin(url)
    if b is None or u is None:
        return False
    return b[:3] == u[:3] and u[3][: len(b[3])] == b[3]


def allowed(url: str, patterns: Iterable[str]) -> bool:
    """Whether the FHIR server ``url`` is one of ``patterns``: base URLs, matched as :func:`same_server` does; a
    port written ``*`` (``http://127.0.0.1:*``) matches any port of that host."""
    for pattern in patterns:
        if ":*" in pattern:
            head, _, tail = pattern.partition(":*")
            target = _origin(url)
            if target is None:
                continue
            fixed = f"{head}:{target[2]}{tail}"
            if same_server(fixed, url):
                return True
        elif same_server(pattern, url):
            return True
    return False


def origin_of(url: str) -> str | None:
    """``scheme://host:port`` of an http(s) URL (a client's ``iss``), the default FHIR server it may name."""
    found = _origin(url)
    if found is None:
        return None
    scheme, host, port, _ = found
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"
