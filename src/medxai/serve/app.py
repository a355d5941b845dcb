"""``create_app(run_dir)``: the FastAPI application of ``medxai serve`` (the contract: ``docs/serve.md``).

The layers, outside in:

1. :class:`_Gate`, a plain ASGI middleware in front of everything: the bearer token, readiness and the bounded
   admission of model requests (503 with ``Retry-After``), and the upload size limit, enforced on the bytes as they
   arrive (a lying or missing ``Content-Length`` changes nothing). It refuses before a byte of the body is read.
2. The routes: decode the upload in a worker thread (content sniffed, decoder limits from :mod:`medxai.data`), hand
   it to the :class:`~medxai.serve.batcher.MicroBatcher`, build the answer in a worker thread, record it in the audit
   log and the metrics.
3. Exception handlers that turn every error into ``{"error", "detail"}`` with the right 4xx status; an unexpected
   error is a 500 that says only "internal error" and the request id (the traceback goes to the server log).

The model loads in the background after start-up, so ``/livez`` answers at once and ``/readyz`` turns 200 only after
one warm-up batch ran.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medxai.config import ServeConfig
from medxai.errors import (
    ConfigError,
    ImageTooLargeError,
    InvalidImageError,
    MedxaiError,
)
from medxai.explain import CAM_METHODS
from medxai.run_folder import RunFolder
from medxai.serve.audit import AuditEntry, AuditLog, audit_url
from medxai.serve.batcher import MicroBatcher, QueueFullError
from medxai.serve.engine import DEFAULT_METHOD, PREDICT, Engine, explain_key
from medxai.serve.metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from medxai.serve.render import (
    ExplainOptions,
    ExplanationStore,
    explanation_body,
    prediction_body,
    threshold_info,
)

__all__ = ["ServiceError", "check_exposure", "create_app", "is_loopback", "read_token", "run_server"]

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MODEL_PATHS = {"/v1/predict": "predict", "/v1/explain": "explain"}
#: Paths anyone may reach when a token is configured: probes, the page (it asks for the token) and the API docs.
OPEN_PATHS = ("/livez", "/readyz", "/", "/docs", "/openapi.json", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
NOT_READY_RETRY_S = 5
_ARRIVING = "medxai.arriving"  # scope key: this request counts in _Service.arriving
QUEUE_FULL_RETRY_S = 1

EngineFactory = Callable[[Path, ServeConfig], Engine]

CamMethod = Enum("CamMethod", {name: name for name in sorted(CAM_METHODS)}, type=str)
OverlayMode = Enum("OverlayMode", {"inline": "inline", "url": "url"}, type=str)
Upload = Annotated[UploadFile, File(description="the image: PNG, JPEG, TIFF, BMP, DICOM or NIfTI (content sniffed)")]


class ServiceError(Exception):
    """An answer other than 200: status, error code, words for the caller, extra headers."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "detail": self.detail}, status_code=self.status,
                            headers=self.headers)


# -- response models (the OpenAPI schema) ------------------------------------------------------------------------
class ErrorBody(BaseModel):
    error: str
    detail: str


class ImageFacts(BaseModel):
    width: int
    height: int
    format: str | None
    sha256: str


class ThresholdInfo(BaseModel):
    value: float
    label: str
    method: str


class ModelRef(BaseModel):
    id: str
    version: str
    medxai_version: str


class PredictBody(BaseModel):
    request_id: str
    model: ModelRef
    label: str
    label_index: int
    probabilities: dict[str, float]
    decision_rule: str
    threshold: ThresholdInfo | None
    in_domain: bool | None
    domain_score: float | None
    domain_reasons: list[str]
    image: ImageFacts
    backend: str
    latency_ms: float


class RawMap(BaseModel):
    shape: list[int]
    dtype: str
    byteorder: str
    data: str


class ExplanationFields(BaseModel):
    method: str
    target_label: str
    width: int
    height: int
    alpha: float
    colormap: str
    overlay_png: str | None
    overlay_url: str | None
    image_png: str | None
    heatmap_png: str | None
    raw_map: RawMap | None


class ExplainBody(PredictBody):
    explanation: ExplanationFields


_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 413, 422, 501, 503, 504)}


# -- security ------------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path | None) -> str | None:
    """The bearer token in ``path`` (surrounding white space stripped); None without a file.

    Raises:
        ConfigError: the file is missing, unreadable, empty or shorter than 16 characters.
    """
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--token-file {path}: cannot be read ({error})") from None
    if len(token) < 16:
        raise ConfigError(f"--token-file {path}: the token must have at least 16 characters")
    return token


def check_exposure(config: ServeConfig) -> None:
    """Refuse to listen beyond loopback without a bearer token.

    Raises:
        ConfigError: ``config.host`` is not a loopback address and no ``token_file`` is given.
    """
    if not is_loopback(config.host) and not config.token_file:
        raise ConfigError(f"--host {config.host} exposes the service beyond this machine: give --token-file with a "
                          "bearer token (or serve on 127.0.0.1)")


# -- the service's state -------------------------------------------------------------------------------------------
@dataclass
class _Service:
    run_dir: Path
    config: ServeConfig
    engine_factory: EngineFactory
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    engine: Engine | None = None
    ready: bool = False
    load_error: str | None = None
    admitted: int = 0
    arriving: int = 0  # admitted requests not yet handed to the batcher (see incoming)
    token: str | None = None
    audit: AuditLog | None = None
    batcher: MicroBatcher | None = None
    store: ExplanationStore | None = None

    def load(self) -> None:
        """Load and warm up the model (in a background thread); readiness follows."""
        try:
            engine = self.engine_factory(self.run_dir, self.config)
            engine.warm_up()
        except Exception as error:
            self.load_error = str(error) if isinstance(error, MedxaiError) else type(error).__name__
            logger.exception("the model could not be loaded from %s", self.run_dir)
            return
        self.engine = engine
        self.ready = True
        self.metrics.ready.set(1)

    def not_ready(self) -> ServiceError:
        """The 503 of a request that needs the model before it is loaded and warmed up (or when loading failed)."""
        detail = ("the model failed to load: " + self.load_error) if self.load_error else \
            "the model is loading; try again shortly"
        return ServiceError(503, "not_ready", detail, {"Retry-After": str(NOT_READY_RETRY_S)})

    def incoming(self) -> int:
        """Requests admitted and not yet handed to the batcher (their bodies are being read or decoded)."""
        return self.arriving

    def submitted(self, scope) -> None:
        """The request of ``scope`` reached the batcher (or failed before): it is no longer on its way."""
        if scope.pop(_ARRIVING, False):
            self.arriving -= 1

    def run_batch(self, key, items):
        return self.engine.run_batch(key, items)

    def on_batch(self, key, size: int, seconds: float) -> None:
        self.metrics.observe_batch(key[0], size, seconds)

    def record(self, endpoint: str, status: int, outcome: str, started: float, **values: Any) -> None:
        """Metrics and the audit log for one model request (whatever its outcome)."""
        seconds = time.perf_counter() - started
        self.metrics.observe_request(endpoint, status, seconds)
        if self.audit is not None:
            values.setdefault("request_id", uuid.uuid4().hex)
            identity = self.engine.identity if self.engine is not None else None
            self.audit.record(AuditEntry(
                endpoint=endpoint, status=status, outcome=outcome, latency_ms=round(seconds * 1000, 3),
                model_id=identity.id if identity else None, model_version=identity.version if identity else None,
                backend=self.engine.backend if self.engine is not None else None, **values))


# -- the gate ------------------------------------------------------------------------------------------------------
class _Gate:
    """Token, readiness, admission and upload size, before the application reads a byte of the body."""

    def __init__(self, app, service: _Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = MODEL_PATHS.get(path) if scope["method"] == "POST" else None
        started = time.perf_counter()
        refusal = self._refusal(scope, path, endpoint)
        if refusal is not None:
            if endpoint is not None:
                self.service.record(endpoint, refusal.status, refusal.error, started)
            await refusal.response()(scope, receive, send)
            return
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        self.service.admitted += 1
        self.service.arriving += 1
        scope[_ARRIVING] = True
        self.service.metrics.queue_depth.set(self.service.admitted)
        try:
            await self._limited(scope, receive, send, endpoint, started)
        finally:
            self.service.submitted(scope)
            self.service.admitted -= 1
            self.service.metrics.queue_depth.set(self.service.admitted)

    def _refusal(self, scope, path: str, endpoint: str | None) -> ServiceError | None:
        service = self.service
        if service.token is not None and not _is_open(path) and not _has_token(scope, service.token):
            return ServiceError(401, "unauthorized", "a bearer token is required: 'Authorization: Bearer <token>'",
                                {"WWW-Authenticate": "Bearer"})
        if endpoint is None:
            return None
        if not service.ready:
            return service.not_ready()
        if service.admitted >= service.config.queue:
            return ServiceError(503, "queue_full", f"{service.admitted} requests are in progress (queue "
                                f"{service.config.queue}); try again shortly",
                                {"Retry-After": str(QUEUE_FULL_RETRY_S)})
        declared = _content_length(scope)
        if declared is not None and declared > _upload_limit(service.config):
            return _upload_too_large(service.config)
        return None

    async def _limited(self, scope, receive, send, endpoint: str, started: float) -> None:
        """Run the app with the body counted as it arrives; past the limit the app sees a disconnect and the
        caller gets 413."""
        limit = _upload_limit(self.service.config)
        received = 0
        too_large = False
        responded = False

        async def counted_receive():
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal responded
            if too_large:
                return  # the app's answer to the cut-off body is replaced by the 413 below
            if message["type"] == "http.response.start":
                responded = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not responded:
            self.service.record(endpoint, 413, "upload_too_large", started)
            await _upload_too_large(self.service.config).response()(scope, receive, send)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _has_token(scope, token: str) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, given = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    return False


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _upload_limit(config: ServeConfig) -> int:
    return int(config.max_upload_mb * 1024 * 1024)


def _upload_too_large(config: ServeConfig) -> ServiceError:
    return ServiceError(413, "upload_too_large", f"the upload is larger than {config.max_upload_mb:g} MB "
                        "(--max-upload-mb)")


# -- errors --------------------------------------------------------------------------------------------------------
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 413: "upload_too_large", 415: "unsupported_media_type", 422: "validation_error"}


def _error_of(error: Exception) -> ServiceError:
    """A request's failure as the answer it deserves (never a 500 for bad input)."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, ImageTooLargeError):
        return ServiceError(413, "image_too_large", error.reason)
    if isinstance(error, InvalidImageError):
        return ServiceError(400, "invalid_image", error.reason)
    if isinstance(error, QueueFullError):
        return ServiceError(503, "queue_full", "too many requests are waiting; try again shortly",
                            {"Retry-After": str(QUEUE_FULL_RETRY_S)})
    if isinstance(error, asyncio.TimeoutError):
        return ServiceError(504, "timeout", "the model did not answer in time (--timeout-s); try again")
    if isinstance(error, ConfigError):
        return ServiceError(400, "bad_request", str(error))
    raise error


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part not in ("body", "query"))
        parts.append(f"{where or 'request'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, error: ServiceError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return ServiceError(422, "validation_error", _validation_detail(error)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(error.status_code, "error")
        detail = error.detail if isinstance(error.detail, str) else code.replace("_", " ")
        return ServiceError(error.status_code, code, detail, dict(error.headers or {})).response()

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        reference = uuid.uuid4().hex[:12]
        logger.error("internal error (reference %s)", reference, exc_info=error)
        return ServiceError(500, "internal", f"internal error (reference {reference}); see the server log").response()


# -- the application -----------------------------------------------------------------------------------------------
def create_app(
    run_dir: str | Path, config: ServeConfig | None = None, *, engine_factory: EngineFactory | None = None
) -> FastAPI:
    """The service of one run folder.

    Args:
        run_dir: a trained run (``medxai train``); nothing else is read.
        config: see :class:`~medxai.config.ServeConfig` (``host`` and ``port`` are the caller's business).
        engine_factory: builds the :class:`~medxai.serve.engine.Engine` (tests hold loading back with one);
            default :meth:`Engine.load`.

    Raises:
        CheckpointError: ``run_dir`` is not a run folder.
        ConfigError: an unreadable token file, a bad limit.
    """
    config = config or ServeConfig()
    run = RunFolder(run_dir)
    run.check_is_run()
    if config.max_batch < 1 or config.queue < 1 or config.max_wait_ms < 0 or config.timeout_s <= 0:
        raise ConfigError("max_batch and queue must be >= 1, max_wait_ms >= 0 and timeout_s > 0")
    service = _Service(run.path, config, engine_factory or Engine.load, token=read_token(config.token_file))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        Image.MAX_IMAGE_PIXELS = config.max_pixels  # the readers' 2D pixel limit, read at each check
        service.audit = AuditLog(audit_url(config.audit_db or run.audit_db_path))
        service.store = ExplanationStore(config.explanations_kept, config.explanations_ttl_s)
        service.batcher = MicroBatcher(service.run_batch, max_batch=config.max_batch,
                                       max_wait_ms=config.max_wait_ms, max_queue=config.queue,
                                       on_batch=service.on_batch, incoming=service.incoming)
        await service.batcher.start()
        loader = threading.Thread(target=service.load, name="medxai-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, loader.join)  # never exit amid loading
            await service.batcher.stop()
            service.audit.close()

    app = FastAPI(title="medxai", version=_version(), lifespan=lifespan,
                  description="Medical image classification with calibrated probabilities, an out-of-domain guard "
                              "and Grad-CAM explanations. Not a medical device.")
    app.state.service = service
    _install_error_handlers(app)
    _add_routes(app, service)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_Gate, service=service)
    return app


def _add_routes(app: FastAPI, service: _Service) -> None:
    @app.get("/livez", tags=["probes"])
    async def livez() -> dict[str, str]:
        """The process answers."""
        return {"status": "alive"}

    @app.get("/readyz", tags=["probes"], responses={503: {"model": ErrorBody}})
    async def readyz() -> dict[str, str]:
        """200 once the model is loaded and one warm-up batch ran; 503 before (or when loading failed)."""
        if not service.ready:
            raise service.not_ready()
        return {"status": "ready", "model": service.engine.identity.id, "version": service.engine.identity.version}

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", tags=["model"], responses={503: {"model": ErrorBody}})
    async def model() -> dict[str, Any]:
        """The model card: what the model is, for what, its labels, decision rule, calibration and CAM methods."""
        return _model_document(_ready_engine(service), service.config)

    @app.post("/v1/predict", tags=["model"], response_model=PredictBody, responses=_ERRORS)
    async def predict(request: Request, file: Upload):
        """Label, calibrated probabilities, decision rule and out-of-domain verdict of one image."""
        return await _answer(service, request, "predict", file, None)

    @app.post("/v1/explain", tags=["model"], response_model=ExplainBody, responses=_ERRORS)
    async def explain(
        request: Request,
        file: Upload,
        method: Annotated[CamMethod, Query(description="CAM method")] = CamMethod[DEFAULT_METHOD],
        target: Annotated[str | None, Query(max_length=200, description="label to explain; default: the decided "
                                                                        "one")] = None,
        alpha: Annotated[float, Query(ge=0.0, le=1.0, description="overlay opacity")] = 0.4,
        colormap: Annotated[str, Query(max_length=40, description="matplotlib colormap")] = "jet",
        overlay: Annotated[OverlayMode, Query(description="inline base64 PNG, or a URL")] = OverlayMode.inline,
        layers: Annotated[bool, Query(description="also the image and the coloured heatmap apart")] = False,
        raw: Annotated[bool, Query(description="also the raw map at the model's input size (float32)")] = False,
    ):
        """The prediction and its heatmap overlay at the image's original resolution, from one forward pass."""
        options = ExplainOptions(alpha=alpha, colormap=_check_colormap(colormap), overlay=overlay.value,
                                 layers=layers, raw=raw)
        return await _answer(service, request, "explain", file, (method.value, target or None, options))

    @app.get("/v1/explanations/{explanation_id}/overlay.png", tags=["model"],
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody}})
    async def explanation_overlay(explanation_id: str) -> Response:
        """An overlay asked for with ``overlay=url``, while it is kept."""
        png = service.store.get(explanation_id) if service.store is not None else None
        if png is None:
            raise ServiceError(404, "not_found", "no such explanation (they are kept for a limited time)")
        return Response(png, media_type="image/png")

    if (STATIC_DIR / "index.html").is_file():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html")


def _ready_engine(service: _Service) -> Engine:
    if not service.ready:
        raise service.not_ready()
    return service.engine


async def _answer(service: _Service, request: Request, endpoint: str, upload: UploadFile, explain: tuple | None
                  ) -> JSONResponse:
    """Decode, batch, answer, record: one model request from start to end."""
    started = time.perf_counter()
    request_id = uuid.uuid4().hex
    engine = _ready_engine(service)
    audit: dict[str, Any] = {"request_id": request_id}
    try:
        if explain is not None:
            method, target, options = explain
            if not engine.can_explain:
                raise ServiceError(501, "not_available", "class activation maps need the PyTorch backend "
                                   f"(gradients); this service runs {engine.backend}: use /v1/predict")
            method = engine.check_explain(method, target)
            audit["cam_method"] = method
            key = explain_key(method, target)
        else:
            key = PREDICT
        data = await upload.read()
        audit["input_sha256"] = digest = hashlib.sha256(data).hexdigest()
        audit["input_bytes"] = len(data)
        decoded = await run_in_threadpool(engine.decode, data)
        del data
        service.submitted(request.scope)
        result = await service.batcher.submit(key, decoded, timeout=service.config.timeout_s)
        prediction = result if explain is None else result.prediction
        body = await run_in_threadpool(_body, engine, decoded, prediction, digest)
        if explain is not None:
            body["explanation"] = await run_in_threadpool(explanation_body, result, options, service.store)
    except Exception as error:  # noqa: BLE001  mapped to its answer; anything unexpected is re-raised
        service.submitted(request.scope)
        try:
            answer = _error_of(error)
        except Exception:
            service.record(endpoint, 500, "internal", started, **audit)
            raise
        service.record(endpoint, answer.status, answer.error, started, **audit)
        return answer.response()
    body = {"request_id": request_id, "model": engine.identity.to_dict(), **body, "backend": engine.backend,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3)}
    service.record(endpoint, 200, "ok", started, label=prediction.label, probabilities=prediction.probabilities,
                   in_domain=prediction.in_domain, domain_score=prediction.domain_score, **audit)
    return JSONResponse(body)


def _body(engine: Engine, decoded, prediction, digest: str) -> dict[str, Any]:
    return prediction_body(prediction, engine.classifier, image=decoded.image, info=decoded.info, sha256=digest)


def _check_colormap(name: str) -> str:
    import matplotlib

    if name not in matplotlib.colormaps:
        raise ServiceError(400, "bad_request", f"unknown colormap {name!r}; e.g. jet, viridis, inferno, turbo")
    return name


def _model_document(engine: Engine, config: ServeConfig) -> dict[str, Any]:
    """``GET /v1/model``: the card without anything local (data paths, member run folders)."""
    card = engine.classifier.card
    return {
        **engine.identity.to_dict(),
        "backend": engine.backend,
        "architecture": card.architecture,
        "label_names": list(card.label_names),
        "positive_label": card.positive_label,
        "threshold": threshold_info(card),
        "decision_rule": engine.classifier.decision_rule(),
        "calibration": card.calibration or {"method": "temperature", "temperature": card.temperature},
        "input_size": card.input_size,
        "channels": card.in_chans,
        "intended_use": card.intended_use,
        "limitations": card.limitations,
        "clinical_use": False,  # medxai models are research tools; nothing here is a cleared medical device
        "domain_guard": engine.classifier.guard is not None,
        "cam_methods": sorted(CAM_METHODS),
        "default_method": DEFAULT_METHOD,
        "explain_available": engine.can_explain,
        "metrics": card.metrics,
        "limits": {"max_upload_bytes": _upload_limit(config), "max_pixels": config.max_pixels,
                   "max_batch": config.max_batch, "queue": config.queue, "timeout_s": config.timeout_s},
    }


def _version() -> str:
    from medxai import __version__

    return __version__


def run_server(run_dir: str | Path, config: ServeConfig | None = None, *, log_level: str = "info") -> None:
    """``medxai serve``: the app on uvicorn until interrupted (loopback unless a token is given)."""
    import uvicorn

    config = config or ServeConfig()
    check_exposure(config)
    app = create_app(run_dir, config)
    logger.info("serving %s on http://%s:%d/ (page at /, API docs at /docs)", run_dir, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, timeout_graceful_shutdown=5)
