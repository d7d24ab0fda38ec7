"""The Ray Serve application: a FastAPI gateway in front of the model replicas.

    biglearn serve --export runs/digits-quick/export       # local Ray + metrics port
    serve deploy biglearn/serve/config.yaml                # onto a running cluster (set args.export)

Routes: POST /v1/complete, GET /v1/model, GET|HEAD /v1/health, GET /openapi.json, GET /docs.

Two deployments. `Completer` holds the model and batches the requests of all callers into shared
model calls. `Gateway` is the HTTP ingress: it checks requests against the schema, calls a
Completer through a handle, and answers every error as RFC 9457 problem details. Because a
completion is a pure function of the request (same seed, same answer), the gateway retries a
request once on another replica when its replica is lost; when none can take it (lost again, or
every queue full) the answer is a 503 with Retry-After. The OpenAPI document is the one this
model follows: its request schema is narrowed to the export and the limits
(biglearn.request_schema). Request checks, batching and PNG handling live in biglearn.serving.
"""

# No `from __future__ import annotations`: Serve ships the classes by value, and FastAPI must
# resolve their annotations (Request, the schemas) in the replica.
import asyncio
import copy
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException

from biglearn.config import apply_overrides, validate_config
from biglearn.data.storage import fetch_folder, is_s3
from biglearn.request_schema import request_schema
from biglearn.serve.batching import Batcher
from biglearn.serving import (
    CompleteRequest,
    CompleteResponse,
    ExportedModel,
    LimitsConfig,
    ModelCard,
    RequestError,
    ServingConfig,
    Task,
    complete_tasks,
    parse_request,
    respond,
)

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
ROUTES = ("/v1/complete", "/v1/model", "/v1/health")
# Defined once: Ray drops a histogram registered with different buckets by different processes.
LATENCY_BUCKETS_MS = [1.0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BUCKETS = [1.0, 2, 4, 8, 16, 32, 64, 128, 256, 512]
PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 1
"""What a 503 for lost capacity asks a client to wait: a new replica takes seconds to start."""
ATTEMPTS = 2
"""Tries of one request on the model replicas: a lost replica's requests are sent once more."""
SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
log = logging.getLogger("biglearn.serve")

# --- metrics --------------------------------------------------------------------------------
# Exported as ray_biglearn_* by Ray's metrics agent (counters end in _total). Ray's exporter
# records histogram observations at their bucket's midpoint, so a histogram's _sum (and a mean
# from it) is approximate; the counters are exact: mean latency = request_seconds / requests,
# mean batch = batched_rows / model_calls.


class GatewayMetrics:
    def __init__(self):
        self.requests = Counter(
            "biglearn_requests",
            description="HTTP requests by route and status",
            tag_keys=("route", "status"),  # pyright: ignore[reportArgumentType]  (Ray's stub says Tuple[str])
        )
        self.request_seconds = Counter(
            "biglearn_request_seconds", description="seconds spent answering requests, by route", tag_keys=("route",)
        )
        self.latency_ms = Histogram(
            "biglearn_request_latency_ms",
            description="time in the gateway per request (quantiles; its _sum is approximate)",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("route",),
        )
        self.rejected = Counter("biglearn_rejected_requests", description="requests refused", tag_keys=("reason",))
        self.retried = Counter("biglearn_retried_requests", description="requests sent again after a replica was lost")


class ModelMetrics:
    def __init__(self):
        self.model_calls = Counter("biglearn_model_calls", description="batched model calls")
        self.batched_rows = Counter("biglearn_batched_rows", description="rows (samples) over all model calls")
        self.batched_requests = Counter("biglearn_batched_requests", description="requests over all model calls")
        self.batch_rows = Histogram(
            "biglearn_batch_rows", description="rows per model call (quantiles)", boundaries=BATCH_BUCKETS
        )
        self.batch_requests = Histogram(
            "biglearn_batch_requests", description="requests per model call (quantiles)", boundaries=BATCH_BUCKETS
        )
        self.samples = Counter("biglearn_samples_generated", description="samples returned")
        self.tokens = Counter("biglearn_tokens_generated", description="target positions filled")
        self.load_seconds = Gauge("biglearn_model_load_seconds", description="time to fetch and load the export")


# --- the model replicas -----------------------------------------------------------------------


def _rows_of(task: Task) -> int:
    return task.num_samples


@dataclass(frozen=True)
class Refusal:
    """A request the model replica will not answer, and why: the gateway answers it as a problem.
    (Returned, not raised: Serve would log a raised one as a failure, with its traceback.)"""

    status: int
    detail: str
    reason: str


@serve.deployment
class Completer:
    """One loaded export; `complete` batches concurrent requests into shared model calls."""

    def __init__(self, export: str, settings: dict[str, Any]):
        self.cfg = validate_config(ServingConfig, settings, "serving settings")
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.metrics = ModelMetrics()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        self.served = ExportedModel(fetch_folder(export), device, self.cfg.limits.max_length)
        self.load_seconds = time.perf_counter() - started
        # One model call at a time: batching, not threads, is how a replica serves many callers.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        batching = self.cfg.batching
        self.batcher = Batcher(self.run_batch, _rows_of, batching.max_batch_rows, batching.batch_wait_timeout_s)

    def check_health(self):
        # Ray stops exporting a gauge that is not set again; the health check comes regularly.
        self.metrics.load_seconds.set(self.load_seconds)

    def contract(self) -> dict[str, Any]:
        """What the gateway publishes: the model card and the request schema for this model."""
        return {"card": self.served.card, "request_schema": request_schema(self.served, self.cfg)}

    def problem(self) -> str | None:
        """Why this model cannot serve, or None. An export that loads and then computes NaN would
        answer garbage: it counts as unusable, and a restart cannot fix it."""
        return self.served.problem

    async def complete(self, body: CompleteRequest) -> CompleteResponse | Refusal:
        if self.served.problem:
            return Refusal(503, self.served.problem, "model_unusable")
        try:
            task = parse_request(body, self.served, self.cfg)
        except RequestError as exc:
            return Refusal(422, str(exc), "invalid_request")
        if self.cfg.batching.enabled:
            samples = await self.batcher.submit(task)
        else:
            samples = (await self.run_batch([task]))[0]
        self.metrics.samples.inc(task.num_samples)
        if task.num_targets:  # Ray's counters refuse an increment of 0
            self.metrics.tokens.inc(task.num_samples * task.num_targets)
        return respond(task, samples, self.served)

    async def run_batch(self, tasks: list[Task]) -> list[torch.Tensor]:
        """One model call for these tasks (on the replica's one model thread), counted."""
        rows = sum(map(_rows_of, tasks))
        self.metrics.model_calls.inc()
        self.metrics.batched_rows.inc(rows)
        self.metrics.batched_requests.inc(len(tasks))
        self.metrics.batch_rows.observe(rows)
        self.metrics.batch_requests.observe(len(tasks))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._model_thread, complete_tasks, self.served.model, tasks, self.served.device
        )


# --- the HTTP gateway --------------------------------------------------------------------------


class Problem(BaseModel):
    """Every error answer (RFC 9457 problem details): the status, its name, and what to change."""

    type: str = Field(default="about:blank", description="about:blank: the status says what kind of error")
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str = Field(description="what was wrong and what to do")
    errors: list[str] | None = Field(default=None, description="one line per schema violation (422)")


api = FastAPI(
    title="biglearn",
    version="1",
    description="Conditional generation p(x_T | x_S) from one universal model. Every error is "
    "application/problem+json (RFC 9457); a 503 with Retry-After asks the client to try again.",
    openapi_url=None,  # served by the gateway: the schema of the model it fronts
    docs_url=None,  # served by the gateway from local assets (no CDN)
    redoc_url=None,
)

# Serve freezes a copy of `api` when the class below is decorated, and ships the class by value:
# middleware and handlers must be registered before it, and what they share with the replica
# lives in this module (functions here are imported by reference in the replica).
_replica: dict[str, Any] = {}


def _share(metrics: GatewayMetrics, limits: LimitsConfig) -> None:
    _replica.update(metrics=metrics, limits=limits)


def _metrics() -> GatewayMetrics | None:
    return _replica.get("metrics")


@api.middleware("http")
async def limit_and_count(request: Request, call_next):
    """Refuses oversized bodies before parsing; counts every answer by route and status."""
    metrics = _metrics()
    route = request.url.path if request.url.path in ROUTES else "other"
    started = time.perf_counter()
    too_large = await _body_too_large(request)
    if too_large:
        response = problem(413, too_large, "body_too_large")
    elif request.method == "POST" and route == "/v1/complete" and _media_type(request) != "application/json":
        given = request.headers.get("content-type") or "none"
        response = problem(
            415, f"content type is {given}; send JSON with content-type: application/json", "unsupported_media_type"
        )
    else:
        try:
            response = await call_next(request)
        except Exception:  # answered here, so that it is counted like every other answer
            log.exception("request failed")
            response = problem(500, "the server failed to answer; its log says why", "internal_error")
    if metrics is not None:
        seconds = time.perf_counter() - started
        metrics.requests.inc(tags={"route": route, "status": str(response.status_code)})
        metrics.request_seconds.inc(seconds, tags={"route": route})
        metrics.latency_ms.observe(seconds * 1000, tags={"route": route})
    return response


def _media_type(request: Request) -> str:
    """The request's content type without parameters (charset), lower case."""
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


async def _body_too_large(request: Request) -> str | None:
    limit = _replica["limits"].max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return f"request body is {declared} bytes; the limit is {limit}"
    if request.method == "POST" and declared is None:  # chunked: count what arrives
        size = len(await request.body())
        if size > limit:
            return f"request body is {size} bytes; the limit is {limit}"
    return None


def problem(
    status: int, detail: str, reason: str, errors: list[str] | None = None, retry_after: bool = False
) -> JSONResponse:
    """An error answer as problem details, counted by `reason`."""
    metrics = _metrics()
    if metrics is not None:
        metrics.rejected.inc(tags={"reason": reason})
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, errors=errors)
    headers = {"retry-after": str(RETRY_AFTER_S)} if retry_after else None
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


@api.exception_handler(RequestValidationError)
async def _schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(err["type"] == "json_invalid" for err in errors):
        ctx = errors[0].get("ctx", {})
        return problem(400, f"body is not valid JSON: {ctx.get('error', 'parse error')}", "malformed_json")
    problems = [_describe(err) for err in errors]
    return problem(422, "; ".join(problems), "invalid_schema", errors=problems)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own answers (404 no such route, 405 method not allowed) as problem details."""
    response = problem(exc.status_code, str(exc.detail), HTTPStatus(exc.status_code).name.lower())
    response.headers.update(exc.headers or {})
    return response


def _describe(err: dict) -> str:
    where = ".".join(str(part) for part in err["loc"][1:]) or "body"
    if err["type"] == "extra_forbidden":
        return f"unknown field '{where}' (see /docs for the fields)"
    if err["type"] == "missing" and where == "body":
        return "body is missing: send a JSON object (see /docs)"
    return f"{where}: {err['msg']}"


ERRORS = {
    "/v1/complete": {
        400: "the body is not valid JSON",
        413: "the body is larger than limits.max_body_bytes",
        415: "the body is not declared as application/json",
        422: "the request does not fit the schema or the model",
        503: "no replica can take the request now (Retry-After), or the model cannot serve",
    },
    "/v1/model": {503: "no replica can answer now (Retry-After)"},
    "/v1/health": {503: "the model cannot serve, or no replica answers (Retry-After)"},
}


def openapi_document(generated: dict[str, Any], contract: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document with the request schema of this model and the errors as they come."""
    document = copy.deepcopy(generated)
    schemas = document["components"]["schemas"]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["CompleteRequest"] = contract["request_schema"]
    schemas["Problem"] = Problem.model_json_schema()
    as_problem = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    retry_after = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            responses.pop("422", None)
            for status, description in ERRORS.get(path, {}).items():
                responses[str(status)] = {"description": description, "content": as_problem}
                if status == 503:
                    responses["503"]["headers"] = retry_after
    return document


@serve.deployment
@serve.ingress(api)
class Gateway:
    """HTTP in front of the Completer replicas: schema checks, retries, problem details."""

    def __init__(self, completer: DeploymentHandle, settings: dict[str, Any]):
        self.cfg = validate_config(ServingConfig, settings, "serving settings")
        self.completer = completer
        self.metrics = GatewayMetrics()
        _share(self.metrics, self.cfg.limits)
        self._contract: dict[str, Any] | None = None

    async def _call(self, method: str, *args) -> Any:
        """A Completer method's answer, or the problem to answer instead (lost or full replicas)."""
        for attempt in range(ATTEMPTS):
            try:
                answer = await getattr(self.completer, method).remote(*args)
                if isinstance(answer, Refusal):
                    return problem(answer.status, answer.detail, answer.reason)
                return answer
            except BackPressureError:
                return problem(503, "every model replica is busy: retry after a second", "overloaded", retry_after=True)
            except DeploymentUnavailableError:
                return problem(503, "the model deployment failed to start; the Serve logs say why", "unavailable")
            except RayActorError:
                if attempt + 1 < ATTEMPTS:
                    self.metrics.retried.inc()
        return problem(
            503, "the model replica was lost; a new one is starting: retry", "replica_lost", retry_after=True
        )

    async def _card_and_schema(self) -> dict[str, Any] | JSONResponse:
        if self._contract is not None:
            return self._contract
        contract = await self._call("contract")
        if not isinstance(contract, JSONResponse):
            self._contract = contract
        return contract

    @api.post("/v1/complete", response_model=CompleteResponse, response_model_exclude_none=True)
    async def complete(self, body: CompleteRequest) -> CompleteResponse | JSONResponse:
        return await self._call("complete", body)

    @api.get("/v1/model", response_model=ModelCard)
    async def model_card(self) -> ModelCard | JSONResponse:
        contract = await self._card_and_schema()
        return contract if isinstance(contract, JSONResponse) else contract["card"]

    @api.api_route("/v1/health", methods=["GET", "HEAD"], response_model=None)
    async def health(self) -> dict | JSONResponse:
        unusable = await self._call("problem")
        if isinstance(unusable, JSONResponse):
            return unusable
        if unusable:
            return problem(503, unusable, "model_unusable")
        contract = await self._card_and_schema()
        return contract if isinstance(contract, JSONResponse) else {"status": "ok", "dataset": contract["card"].dataset}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        contract = await self._card_and_schema()
        if isinstance(contract, JSONResponse):
            return contract
        document = openapi_document(request.app.openapi(), contract)
        root = request.scope.get("root_path", "").rstrip("/")
        if root:  # served under a route prefix: clients (and /docs) call the routes there
            document["servers"] = [{"url": root}]
        return JSONResponse(document)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title="biglearn",
            swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
            swagger_favicon_url=f"{root}/docs/assets/favicon-32x32.png",
        )

    @api.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(self, name: str) -> Response:
        from swagger_ui_bundle import swagger_ui_path

        if name not in SWAGGER_ASSETS:
            return problem(404, f"no asset {name!r}; /docs loads {', '.join(SWAGGER_ASSETS)}", "not_found")
        return FileResponse(str(swagger_ui_path / name))


# --- building the application ------------------------------------------------------------------


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (`import_path: biglearn.serve.app:build_app`); args = {export, settings}."""
    return _bind(args, {})


def resolved_serve_config(
    path: str | Path = DEFAULT_CONFIG, export: str | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The Serve config file at `path` with `export` and the settings `overrides` (`a.b=value`)
    applied to its one application; the settings are checked (ConfigError says what is wrong)."""
    config = yaml.safe_load(Path(path).read_text())
    (application,) = config["applications"]
    args = dict(application.get("args") or {})
    if export is not None:
        args["export"] = export
    args["settings"] = apply_overrides(args.get("settings") or {}, list(overrides))
    validate_config(ServingConfig, args["settings"], "serving settings")
    return {**config, "applications": [{**application, "args": args}]}


def app_from_config(
    path: str | Path = DEFAULT_CONFIG,
    export: str | None = None,
    overrides: Sequence[str] = (),
    deployment: dict[str, Any] | None = None,
) -> tuple[serve.Application, dict[str, Any], dict[str, Any]]:
    """The application a Serve config file describes, for `serve.run`.

    `overrides` (`a.b=value`) apply to the application's settings, `deployment` to the
    Completer's options (num_replicas replaces autoscaling). Returns (app, run kwargs, http_options).
    """
    config = resolved_serve_config(path, export, overrides)
    (application,) = config["applications"]
    args = application["args"]
    options = {
        entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in application.get("deployments") or []
    }
    completer = options.get("Completer", {}) | (deployment or {})
    if "num_replicas" in (deployment or {}):
        completer.pop("autoscaling_config", None)
    options["Completer"] = completer
    export = str(args.get("export", ""))
    if not is_s3(export) and not (Path(export) / "model.json").is_file():
        raise ValueError(
            f"export {export!r} is not an export folder (no model.json); train one with `biglearn pretrain`"
        )
    run_kwargs = {
        "name": application["name"],
        "route_prefix": application.get("route_prefix", "/"),
        "logging_config": application.get("logging_config"),
    }
    return _bind(args, options), run_kwargs, config.get("http_options", {})


def _bind(args: dict[str, Any], options: dict[str, dict[str, Any]]) -> serve.Application:
    unknown = set(args) - {"export", "settings"}
    if unknown or "export" not in args:
        raise ValueError(f"application args take 'export' (required) and 'settings'; got {sorted(args)}")
    strangers = set(options) - {"Gateway", "Completer"}
    if strangers:
        raise ValueError(f"deployments are named Gateway and Completer; got {sorted(strangers)}")
    settings = args.get("settings") or {}
    validate_config(ServingConfig, settings, "serving settings")  # fail at deploy time, not in the replica
    completer = Completer.options(**options.get("Completer", {})).bind(str(args["export"]), settings)
    return Gateway.options(**options.get("Gateway", {})).bind(completer, settings)
