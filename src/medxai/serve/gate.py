"""The gate: a plain ASGI middleware in front of every route of ``medxai serve`` (the contract: ``docs/serve.md``).

For every request, in this order, each refusal a JSON error:

1. the ``Host`` header names this server (400 ``bad_host``: a page on another name that resolves to this address,
   DNS rebinding, gets nothing; the probes are exempt);
2. the bearer token, where one is configured (401);
3. no cross-site form posts: a POST that a browser marks as coming from another site, without a token, is refused
   (403 ``cross_site``);
4. at most ``max_connections_per_client`` requests of one client address in progress (429).

A model request (``POST /v1/predict``, ``/v1/explain``) then has its body RECEIVED by the gate, before it counts
against ``--queue``: bounded in size (413), in time (no pause over ``read_timeout_s``, and after that grace at least
``min_upload_rate`` bytes per second on average; 408) and, over all requests being received at once, in memory
(``receive_budget_mb``; 503 ``busy``). Only a complete body is admitted (503 ``queue_full`` beyond ``--queue``) and
replayed to the route, so a slow client holds a connection for a bounded time, never an admission slot.

Every answer gets the security headers (a strict Content-Security-Policy, ``nosniff``, no framing, ``no-store``
except for the static assets), and every answer to a model request, whatever produced it (this gate, FastAPI's
validation, Starlette's multipart parser, a route, a 500), is recorded exactly once in the metrics and the audit log,
with one log line for a refusal (INFO for the client's errors; never a traceback for them).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from medxai.serve.errors import (
    ANSWER,
    RETRY_AFTER_S,
    ServiceError,
    error_response,
    queue_full,
    status_code_name,
    unexpected_error,
)

__all__ = ["AUDIT", "MODEL_PATHS", "Gate", "GateLimits", "ReceiveBudget", "security_headers"]

logger = logging.getLogger(__name__)

MODEL_PATHS = {"/v1/predict": "predict", "/v1/explain": "explain"}
#: Paths anyone may reach when a token is configured: probes, the page (it asks for the token) and the API docs.
OPEN_PATHS = ("/livez", "/readyz", "/", "/docs", "/openapi.json", "/favicon.ico")
OPEN_PREFIXES = ("/static/", "/docs/")
#: Probes answer whatever ``Host`` they are asked under (an orchestrator probes the pod's address).
ANY_HOST_PATHS = ("/livez", "/readyz")
#: Paths whose answers may be cached: the page's scripts and styles, the API docs' assets.
CACHEABLE_PREFIXES = ("/static/", "/docs/")
#: Scope key: the audit values of a model request (request id, upload digest, label...), filled as it goes.
AUDIT = "medxai.audit"
CLIENT_CLOSED = 499  # nginx's status for "the client went away before the answer"; a metrics and audit value only

_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def security_headers(docs_script_hashes: tuple[str, ...] = ()) -> Callable[[str], list[tuple[bytes, bytes]]]:
    """The headers every answer to ``path`` carries.

    Args:
        docs_script_hashes: ``sha256-...`` sources of the inline script of ``/docs`` (Swagger UI's start-up), the one
            inline script the CSP allows, on that page only.
    """
    common = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
              (b"referrer-policy", b"no-referrer")]
    page = [*common, (b"content-security-policy", _PAGE_CSP.encode())]
    docs_sources = " ".join(f"'{source}'" for source in docs_script_hashes)
    docs = [*common, (b"content-security-policy", _PAGE_CSP.replace(
        "script-src 'self'", f"script-src 'self' {docs_sources}".rstrip()).encode())]
    no_store = [(b"cache-control", b"no-store")]

    def headers(path: str) -> list[tuple[bytes, bytes]]:
        chosen = docs if path == "/docs" else page
        return chosen if path.startswith(CACHEABLE_PREFIXES) else [*chosen, *no_store]

    return headers


@dataclass(frozen=True)
class GateLimits:
    """What the gate enforces (from :class:`~medxai.config.ServeConfig`, see there)."""

    upload_bytes: int
    read_timeout_s: float
    min_upload_rate: float  # bytes per second, averaged, after read_timeout_s
    per_client: int  # 0: no cap
    allowed_hosts: frozenset[str]  # lower-case names; "*" allows any
    cors_origins: frozenset[str]

    def upload_deadline(self, started: float, received: int) -> float:
        """When the body must be complete, given what arrived (Apache mod_reqtimeout's ``MinRate`` scheme)."""
        return started + self.read_timeout_s + received / self.min_upload_rate


def allowed_hosts(bound: str, extra: list[str]) -> frozenset[str]:
    """The ``Host`` names a server bound to ``bound`` answers: loopback names, the bound address unless it is a
    wildcard, and ``extra`` (``--allowed-host``)."""
    names = {*_LOOPBACK_NAMES, *(name.strip().lower() for name in extra if name.strip())}
    bound = bound.strip().lower().strip("[]")
    if bound not in _WILDCARD_ADDRESSES:
        names.add(bound)
    return frozenset(names)


class ReceiveBudget:
    """Bytes held by bodies being received, over all requests: a reservation past ``capacity`` is refused."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.capacity:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class _Refused(Exception):
    """The body could not be received: answer ``error`` (None: the client is gone, answer nothing)."""

    def __init__(self, error: ServiceError | None) -> None:
        super().__init__(error.detail if error else "client closed")
        self.error = error


class Gate:
    """The ASGI middleware of this module's docstring.

    Args:
        app: the FastAPI application.
        service: the app's state (``medxai.serve.app._Service``): token, readiness, admission counts, recording.
        limits: see :class:`GateLimits`.
        headers: :func:`security_headers`.
    """

    def __init__(self, app, *, service, limits: GateLimits, headers: Callable[[str], list]) -> None:
        self.app = app
        self.service = service
        self.limits = limits
        self.headers = headers
        self.budget = ReceiveBudget(int(service.config.receive_budget_mb * 1024 * 1024))
        self.per_client: dict[str, int] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = MODEL_PATHS.get(path) if scope["method"] == "POST" else None
        if endpoint is not None:
            scope[AUDIT] = {"request_id": uuid.uuid4().hex}
        exchange = _Exchange(self, scope, send, endpoint)
        refusal = self._refusal(scope, path, endpoint)
        if refusal is not None:
            await exchange.answer(refusal, receive)
            return
        client = _client_address(scope)
        self.per_client[client] = self.per_client.get(client, 0) + 1
        try:
            if endpoint is None:
                await exchange.run(self.app, receive)
            else:
                await self._model_request(exchange, scope, receive)
        finally:
            self._leave(client)

    def _leave(self, client: str) -> None:
        left = self.per_client[client] - 1
        if left:
            self.per_client[client] = left
        else:
            del self.per_client[client]

    def _refusal(self, scope, path: str, endpoint: str | None) -> ServiceError | None:
        """The answer of a request refused on its headers alone (None: go on)."""
        service, limits = self.service, self.limits
        if path not in ANY_HOST_PATHS and not _host_allowed(scope, limits.allowed_hosts):
            return ServiceError(400, "bad_host", "the Host header does not name this server (start it with "
                                "--allowed-host NAME to answer under another name)")
        if service.token is not None and not _is_open(path) and not _has_token(scope, service.token):
            return ServiceError(401, "unauthorized", "a bearer token is required: 'Authorization: Bearer <token>'",
                                {"WWW-Authenticate": "Bearer"})
        # A browser's cross-site form cannot set Authorization, and a cross-site fetch that does needs CORS.
        if scope["method"] not in _SAFE_METHODS and _header(scope, b"authorization") is None \
                and _cross_site(scope, limits.cors_origins):
            return ServiceError(403, "cross_site", "a request from another site needs a bearer token (or "
                                "--cors-origin for its origin)")
        if limits.per_client and self.per_client.get(_client_address(scope), 0) >= limits.per_client:
            return ServiceError(429, "too_many_requests", f"{limits.per_client} requests from this address are in "
                                "progress (--max-connections-per-client); try again shortly",
                                {"Retry-After": str(RETRY_AFTER_S)})
        if endpoint is None:
            return None
        if not service.ready:
            return service.not_ready()
        declared = _content_length(scope)
        if declared is not None and declared > limits.upload_bytes:
            return self._upload_too_large()
        if service.admitted >= service.config.queue:
            return self._queue_full()  # full already: not worth receiving the body
        return None

    async def _model_request(self, exchange: _Exchange, scope, receive) -> None:
        """Receive the body, admit the request, run the route on the received body."""
        service = self.service
        service.receiving += 1
        try:
            chunks = await self._receive_body(scope, receive)
        except _Refused as refused:
            if refused.error is None:
                exchange.record(CLIENT_CLOSED, "client_closed", "the client closed the connection during the upload")
            else:
                await exchange.answer(refused.error, receive)
            return
        finally:
            service.receiving -= 1
        if service.admitted >= service.config.queue:
            await exchange.answer(self._queue_full(), receive)
            return
        service.admit(scope)
        try:
            await exchange.run(self.app, _replay(chunks, receive))
        finally:
            service.release(scope)

    async def _receive_body(self, scope, receive) -> deque[bytes]:
        """The request's body as it arrived, within the size, time and memory limits (or :class:`_Refused`)."""
        limits = self.limits
        declared = max(_content_length(scope) or 0, 0)
        if not self.budget.take(declared):
            raise _Refused(self._busy())
        reserved, received, chunks = declared, 0, deque()
        started = time.monotonic()
        try:
            while True:
                wait = min(limits.read_timeout_s, limits.upload_deadline(started, received) - time.monotonic())
                try:
                    message = await asyncio.wait_for(receive(), max(wait, 0.0))
                except asyncio.TimeoutError:
                    raise _Refused(self._too_slow()) from None
                if message["type"] == "http.disconnect":
                    raise _Refused(None)
                body = message.get("body", b"")
                received += len(body)
                if received > limits.upload_bytes:
                    raise _Refused(self._upload_too_large())
                if received > reserved:  # a body longer than declared, or none declared (chunked)
                    if not self.budget.take(received - reserved):
                        raise _Refused(self._busy())
                    reserved = received
                if body:
                    chunks.append(body)
                if not message.get("more_body", False):
                    return chunks
        finally:
            self.budget.give(reserved)

    def _upload_too_large(self) -> ServiceError:
        megabytes = self.service.config.max_upload_mb
        return ServiceError(413, "upload_too_large", f"the upload is larger than {megabytes:g} MB (--max-upload-mb)",
                            {"Connection": "close"})

    def _too_slow(self) -> ServiceError:
        limits = self.limits
        return ServiceError(408, "request_timeout", f"the upload did not arrive in time: no pause over "
                            f"{limits.read_timeout_s:g} s and, after that, at least "
                            f"{limits.min_upload_rate / 1024:g} KiB/s (--read-timeout-s, --min-upload-rate)",
                            {"Connection": "close"})

    def _busy(self) -> ServiceError:
        return ServiceError(503, "busy", "the server is receiving too many uploads at once; try again shortly",
                            {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})

    def _queue_full(self) -> ServiceError:
        service = self.service
        return queue_full(f"{service.admitted} requests are in progress (queue {service.config.queue}); "
                          "try again shortly")


class _Exchange:
    """One request's answer as it leaves: security headers added, and for a model request exactly one record
    (metrics, audit, log line)."""

    def __init__(self, gate: Gate, scope, send, endpoint: str | None) -> None:
        self.gate, self.scope, self._send, self.endpoint = gate, scope, send, endpoint
        self.started = time.perf_counter()
        self.responded = False
        self.recorded = False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.responded = True
            headers = [*message.get("headers", []), *self.gate.headers(self.scope["path"])]
            request_id = self.scope.get(AUDIT, {}).get("request_id")
            if request_id is not None:
                headers.append((b"x-request-id", request_id.encode()))
            message = {**message, "headers": headers}
            answer = self.scope.get(ANSWER)
            status = message["status"]
            if answer is not None and answer.status == status:
                self.record(status, answer.error, answer.detail)
            else:
                self.record(status, "ok" if status == 200 else status_code_name(status), None)
        await self._send(message)

    def record(self, status: int, outcome: str, detail: str | None) -> None:
        """Metrics, audit row and log line of a model request's answer, once."""
        if self.endpoint is None or self.recorded:
            return
        self.recorded = True
        values = dict(self.scope.get(AUDIT, {}))
        self.gate.service.record(self.endpoint, status, outcome, self.started, **values)
        if status != 200:
            level = logging.INFO if status < 500 else logging.WARNING
            logger.log(level, "%s %d %s (request %s)%s", self.endpoint, status, outcome,
                       values.get("request_id", "-"), f": {detail}" if detail else "")

    async def answer(self, error: ServiceError, receive) -> None:
        await error_response(self.scope, error)(self.scope, receive, self.send)

    async def run(self, app, receive) -> None:
        """The app's answer; an error it did not expect is a 500 answered here (no traceback for the client)."""
        try:
            await app(self.scope, receive, self.send)
        except Exception as error:
            if self.responded:
                raise
            await self.answer(unexpected_error(error), receive)


def _replay(chunks: deque[bytes], receive):
    """A ``receive`` that gives the app the body received already, then the connection's own events (a disconnect)."""
    pending = True

    async def replayed():
        nonlocal pending
        if pending:
            body = chunks.popleft() if chunks else b""
            pending = bool(chunks)
            return {"type": "http.request", "body": body, "more_body": pending}
        return await receive()

    return replayed


def _client_address(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "-"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _host_name(authority: str) -> str:
    """``host[:port]`` or ``[v6]:port`` without the port, lower-case."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].partition("]")[0]
    return authority.rpartition(":")[0] if authority.count(":") == 1 else authority


def _host_allowed(scope, allowed: frozenset[str]) -> bool:
    if "*" in allowed:
        return True
    host = _header(scope, b"host")
    return host is not None and _host_name(host) in allowed


def _cross_site(scope, cors_origins: frozenset[str]) -> bool:
    """Whether a browser says this request comes from another site (``Sec-Fetch-Site``, else ``Origin``) than the
    page it asks, and the origin is not one ``--cors-origin`` allows."""
    origin = _header(scope, b"origin")
    if origin is not None and origin in cors_origins:
        return False
    fetch_site = _header(scope, b"sec-fetch-site")
    if fetch_site is not None:
        return fetch_site.lower() not in ("same-origin", "none")
    if origin is None:
        return False  # not a browser's cross-origin request (curl, scripts, old browsers' same-origin posts)
    own = _header(scope, b"host") or ""
    return origin.lower().partition("://")[2] != own.lower()


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _has_token(scope, token: str) -> bool:
    value = _header(scope, b"authorization")
    if value is None:
        return False
    scheme, _, given = value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None

