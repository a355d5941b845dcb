"""``create_app(run_dir)``: the FastAPI application of ``medxai serve`` (the contract: ``docs/serve.md``).

The layers, outside in:

1. :class:`~medxai.serve.gate.Gate`, a plain ASGI middleware in front of everything: Host, token and cross-site
   checks, a cap per client address, readiness, the upload received within size, time and memory limits BEFORE the
   request is admitted against ``--queue``, security headers, and one audit row and metrics observation for every
   answer to a model request.
2. The routes: decode the upload in one of the service's worker threads (content sniffed, decoder limits from
   :mod:`medxai.data`), hand it to the :class:`~medxai.serve.batcher.MicroBatcher`, build the answer in a worker
   thread.
3. Exception handlers (:mod:`medxai.serve.errors`) that turn every error into ``{"error", "detail"}`` with the right
   status and no file path; an unexpected error is a 500 that says only "internal error" and a reference.

The model loads in the background after start-up, so ``/livez`` answers at once and ``/readyz`` turns 200 only after
one warm-up batch ran.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel

from medxai.config import ServeConfig
from medxai.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InvalidImageError,
    MedxaiError,
    ModelError,
)
from medxai.explain import CAM_METHODS
from medxai.run_folder import RunFolder
from medxai.serve.audit import AuditEntry, AuditLog, audit_url
from medxai.serve.batcher import MicroBatcher
from medxai.serve.engine import DEFAULT_METHOD, PREDICT, Engine, explain_key
from medxai.serve.errors import ServiceError, install_error_handlers
from medxai.serve.gate import AUDIT, Gate, GateLimits, allowed_hosts, security_headers
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
NOT_READY_RETRY_S = 5
_ARRIVING = "medxai.arriving"  # scope key: this request counts in _Service.arriving
#: What a failed load says to callers, by kind of error (the details, paths included, go to the server log only).
_LOAD_FAILURES = ((CheckpointError, "checkpoint unreadable"), (ConfigError, "configuration invalid"),
                  (ModelError, "model cannot be built"), (DataError, "run data unreadable"),
                  (InvalidImageError, "warm-up image unreadable"), (MedxaiError, "run unusable"),
                  (OSError, "file unreadable"), (MemoryError, "out of memory"))

EngineFactory = Callable[[Path, ServeConfig], Engine]

CamMethod = Enum("CamMethod", {name: name for name in sorted(CAM_METHODS)}, type=str)
OverlayMode = Enum("OverlayMode", {"inline": "inline", "url": "url"}, type=str)
Upload = Annotated[UploadFile, File(description="the image: PNG, JPEG, TIFF, BMP, DICOM or NIfTI (content sniffed)")]


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


_ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 408, 413, 422, 429, 501, 503, 504)}


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
    receiving: int = 0  # model requests whose body is being received (see incoming)
    token: str | None = None
    audit: AuditLog | None = None
    batcher: MicroBatcher | None = None
    store: ExplanationStore | None = None
    workers: anyio.CapacityLimiter | None = None

    def load(self) -> None:
        """Load and warm up the model (in a background thread); readiness follows.

        A failure is logged here, with the run's path and the error, for the operator; callers are told only what
        failed, in words (:meth:`not_ready`)."""
        try:
            engine = self.engine_factory(self.run_dir, self.config)
            engine.warm_up()
        except Exception as error:
            self.load_error = next((words for kind, words in _LOAD_FAILURES if isinstance(error, kind)),
                                   "unexpected error")
            if isinstance(error, MedxaiError):
                logger.error("the model could not be loaded from %s: %s", self.run_dir, error)
            else:
                logger.exception("the model could not be loaded from %s", self.run_dir)
            return
        self.engine = engine
        self.ready = True
        self.metrics.ready.set(1)

    def not_ready(self) -> ServiceError:
        """The 503 of a request that needs the model before it is loaded and warmed up (or when loading failed)."""
        detail = f"the model failed to load ({self.load_error}); see the server log" if self.load_error else \
            "the model is loading; try again shortly"
        return ServiceError(503, "not_ready", detail, {"Retry-After": str(NOT_READY_RETRY_S)})

    def admit(self, scope) -> None:
        """A model request whose body is in counts against ``--queue`` until it is answered."""
        self.admitted += 1
        self.arriving += 1
        scope[_ARRIVING] = True
        self.metrics.queue_depth.set(self.admitted)

    def release(self, scope) -> None:
        self.submitted(scope)
        self.admitted -= 1
        self.metrics.queue_depth.set(self.admitted)

    def incoming(self) -> int:
        """Model requests on their way to the batcher: their body being received, or admitted and being decoded."""
        return self.receiving + self.arriving

    def submitted(self, scope) -> None:
        """The request of ``scope`` reached the batcher (or failed before): it is no longer on its way."""
        if scope.pop(_ARRIVING, False):
            self.arriving -= 1

    async def in_worker(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in one of the service's own worker threads (decoding, encoding).

        Their number is bounded (``worker_threads``), not anyio's default 40: each thread that allocates gets a
        malloc arena of its own, which keeps what it freed, so memory under many concurrent uploads grows with the
        number of threads (``benchmarks/serve_memory.py``)."""
        return await anyio.to_thread.run_sync(function, *args, limiter=self.workers)

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


def _upload_limit(config: ServeConfig) -> int:
    return int(config.max_upload_mb * 1024 * 1024)


# -- the application -----------------------------------------------------------------------------------------------
def create_app(
    run_dir: str | Path, config: ServeConfig | None = None, *, engine_factory: EngineFactory | None = None
) -> FastAPI:
    """The service of one run folder.

    Args:
        run_dir: a trained run (``medxai train``); nothing else is read.
        config: see :class:`~medxai.config.ServeConfig` (``host`` and ``port`` are the caller's business, but the
            ``Host`` header is checked against ``host`` and ``allowed_hosts``).
        engine_factory: builds the :class:`~medxai.serve.engine.Engine` (tests hold loading back with one);
            default :meth:`Engine.load`.

    Raises:
        CheckpointError: ``run_dir`` is not a run folder.
        ConfigError: an unreadable token file, a bad limit.
    """
    config = config or ServeConfig()
    run = RunFolder(run_dir)
    run.check_is_run()
    _check_limits(config)
    service = _Service(run.path, config, engine_factory or Engine.load, token=read_token(config.token_file))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        Image.MAX_IMAGE_PIXELS = config.max_pixels  # the readers' 2D pixel limit, read at each check
        service.audit = AuditLog(audit_url(config.audit_db or run.audit_db_path))
        service.store = ExplanationStore(config.explanations_kept, config.explanations_ttl_s)
        service.workers = anyio.CapacityLimiter(config.worker_threads)
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

    app = FastAPI(title="medxai", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Medical image classification with calibrated probabilities, an out-of-domain guard "
                              "and Grad-CAM explanations. Not a medical device.")
    app.state.service = service
    install_error_handlers(app)
    _add_routes(app, service)
    docs_hashes = _add_docs(app)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    limits = GateLimits(upload_bytes=_upload_limit(config), read_timeout_s=config.read_timeout_s,
                        min_upload_rate=config.min_upload_rate, per_client=config.max_connections_per_client,
                        allowed_hosts=allowed_hosts(config.host, config.allowed_hosts),
                        cors_origins=frozenset(config.cors_origins))
    app.add_middleware(Gate, service=service, limits=limits, headers=security_headers(docs_hashes))
    return app


def _check_limits(config: ServeConfig) -> None:
    """Raises ConfigError for a limit that cannot work."""
    positive = {"max_batch": config.max_batch, "queue": config.queue, "timeout_s": config.timeout_s,
                "max_upload_mb": config.max_upload_mb, "header_timeout_s": config.header_timeout_s,
                "read_timeout_s": config.read_timeout_s, "min_upload_rate": config.min_upload_rate,
                "receive_budget_mb": config.receive_budget_mb, "worker_threads": config.worker_threads}
    wrong = [name for name, value in positive.items() if not value > 0]
    if wrong or min(config.max_wait_ms, config.max_connections_per_client, config.malloc_arenas) < 0:
        raise ConfigError(f"serve limits must be > 0 ({', '.join(wrong) or 'all fine'}), max_wait_ms, "
                          "max_connections_per_client and malloc_arenas >= 0")
    if config.receive_budget_mb < config.max_upload_mb:
        raise ConfigError(f"receive_budget_mb ({config.receive_budget_mb:g}) must hold one upload of "
                          f"max_upload_mb ({config.max_upload_mb:g})")


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
        return await _answer(service, request, file, None)

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
        return await _answer(service, request, file, (method.value, target or None, options))

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


def _add_docs(app: FastAPI) -> tuple[str, ...]:
    """``/docs``: Swagger UI from the files the ``swagger-ui-bundle-v2`` package ships (no CDN, a pinned version).

    Returns:
        the CSP sources (``sha256-...``) of the page's inline start-up script, the only inline script allowed.
    """
    from swagger_ui_bundle import swagger_ui_path

    assets = Path(str(swagger_ui_path))
    app.mount("/docs/assets", StaticFiles(directory=assets), name="swagger-ui")
    html = get_swagger_ui_html(openapi_url=app.openapi_url, title="medxai API",
                               swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs/assets/swagger-ui.css",
                               swagger_favicon_url="/docs/assets/favicon-32x32.png",
                               swagger_ui_parameters={"validatorUrl": None}).body.decode()

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(html)

    inline = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    return tuple("sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() for script in inline)


def _ready_engine(service: _Service) -> Engine:
    if not service.ready:
        raise service.not_ready()
    return service.engine


async def _answer(service: _Service, request: Request, upload: UploadFile, explain: tuple | None) -> JSONResponse:
    """Decode, batch, answer: one model request, admitted by the gate with its body in. Its failures go to the error
    handlers; the gate records the answer with the values gathered here."""
    started = time.perf_counter()
    engine = _ready_engine(service)
    audit: dict[str, Any] = request.scope[AUDIT]
    try:
        if explain is not None:
            method, target, options = explain
            if not engine.can_explain:
                raise ServiceError(501, "not_available", "class activation maps need the PyTorch backend "
                                   f"(gradients); this service runs {engine.backend}: use the predict endpoint")
            method = engine.check_explain(method, target)
            audit["cam_method"] = method
            key = explain_key(method, target)
        else:
            key = PREDICT
        data = await upload.read()
        audit["input_sha256"] = digest = hashlib.sha256(data).hexdigest()
        audit["input_bytes"] = len(data)
        decoded = await service.in_worker(engine.decode, data)
        del data
    finally:
        service.submitted(request.scope)
    result = await service.batcher.submit(key, decoded, timeout=service.config.timeout_s)
    prediction = result if explain is None else result.prediction
    body = await service.in_worker(_body, engine, decoded, prediction, digest)
    if explain is not None:
        body["explanation"] = await service.in_worker(explanation_body, result, options, service.store)
    audit.update(label=prediction.label, probabilities=prediction.probabilities, in_domain=prediction.in_domain,
                 domain_score=prediction.domain_score)
    return JSONResponse({"request_id": audit["request_id"], "model": engine.identity.to_dict(), **body,
                         "backend": engine.backend, "latency_ms": round((time.perf_counter() - started) * 1000, 3)})


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
    """``medxai serve``: the app on uvicorn until interrupted (loopback unless a token is given).

    Raises:
        ConfigError: exposure without a token, a bad limit, or uvicorn could not start (the port is taken...).
    """
    import uvicorn

    from medxai.serve.server import tune_malloc, uvicorn_config

    config = config or ServeConfig()
    check_exposure(config)
    if config.malloc_arenas:
        tune_malloc(config.malloc_arenas)
    app = create_app(run_dir, config)
    logger.info("serving %s on http://%s:%d/ (page at /, API docs at /docs)", run_dir, config.host, config.port)
    server = uvicorn.Server(uvicorn_config(app, config, log_level=log_level))
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn shut down gracefully (as uvicorn.run does)
    if not server.started:
        raise ConfigError(f"the server could not start on {config.host}:{config.port} (see the log above)")
