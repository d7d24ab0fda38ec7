"""The Ray Serve application: a FastAPI ingress over one export, with batching across callers.

    biglearn serve --export runs/digits-quick/export       # local Ray + metrics port
    serve deploy biglearn/serve/config.yaml                # onto a running cluster (set args.export)

Routes (OpenAPI at /docs): POST /v1/complete, GET /v1/model, GET /v1/health. Request checks,
batching and PNG handling live in biglearn.serving; this file wires them to Serve and metrics.
"""

# No `from __future__ import annotations`: Serve ships the class by value, and FastAPI must
# resolve its annotations (Request, the schemas) in the replica.
import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from biglearn.config import apply_overrides, validate_config
from biglearn.data.storage import fetch_folder, is_s3
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

# --- metrics --------------------------------------------------------------------------------


class Metrics:
    """Exported as ray_biglearn_* by Ray's metrics agent (counters end in _total)."""

    def __init__(self):
        self.requests = Counter(
            "biglearn_requests",
            description="HTTP requests by route and status",
            tag_keys=("route", "status"),  # pyright: ignore[reportArgumentType]  (Ray's stub says Tuple[str])
        )
        self.latency_ms = Histogram(
            "biglearn_request_latency_ms",
            description="time in the replica per request",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("route",),
        )
        self.batch_rows = Histogram(
            "biglearn_batch_rows", description="rows (samples) per model call", boundaries=BATCH_BUCKETS
        )
        self.batch_requests = Histogram(
            "biglearn_batch_requests", description="requests per model call", boundaries=BATCH_BUCKETS
        )
        self.samples = Counter("biglearn_samples_generated", description="samples returned")
        self.tokens = Counter("biglearn_tokens_generated", description="target positions filled")
        self.rejected = Counter("biglearn_rejected_requests", description="requests refused", tag_keys=("reason",))
        self.load_seconds = Gauge("biglearn_model_load_seconds", description="time to fetch and load the export")


# --- the ingress ------------------------------------------------------------------------------

api = FastAPI(
    title="biglearn",
    version="1",
    description="Conditional generation p(x_T | x_S) from one universal model.",
)


def _rows(tasks: list[Task]) -> int:
    return sum(task.num_samples for task in tasks)


# Serve freezes a copy of `api` when the class below is decorated, and ships the class by value:
# middleware and handlers must be registered before it, and what they share with the replica
# lives in this module (functions here are imported by reference in the replica).
_replica: dict[str, Any] = {}


def _share(metrics: Metrics, limits: LimitsConfig) -> None:
    _replica.update(metrics=metrics, limits=limits)


def _metrics() -> Metrics | None:
    return _replica.get("metrics")


@api.middleware("http")
async def limit_and_count(request: Request, call_next):
    """Refuses oversized bodies before parsing; counts every answer by route and status."""
    metrics = _metrics()
    route = request.url.path if request.url.path in ROUTES else "other"
    started = time.perf_counter()
    too_large = await _body_too_large(request)
    if too_large:
        response = _reject(request, 413, too_large, "body_too_large")
    elif request.method == "POST" and _media_type(request) != "application/json":
        given = request.headers.get("content-type") or "none"
        response = _reject(
            request,
            415,
            f"content type is {given}; send JSON with content-type: application/json",
            "unsupported_media_type",
        )
    else:
        response = await call_next(request)
    if metrics is not None:
        metrics.requests.inc(tags={"route": route, "status": str(response.status_code)})
        metrics.latency_ms.observe((time.perf_counter() - started) * 1000, tags={"route": route})
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


def _reject(request: Request, status: int, detail: Any, reason: str, **extra) -> JSONResponse:
    metrics = _metrics()
    if metrics is not None:
        metrics.rejected.inc(tags={"reason": reason})
    return JSONResponse({"detail": detail, **extra}, status_code=status)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _reject(request, 422, str(exc), "invalid_request")


@api.exception_handler(RequestValidationError)
async def _schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(err["type"] == "json_invalid" for err in errors):
        ctx = errors[0].get("ctx", {})
        return _reject(request, 400, f"body is not valid JSON: {ctx.get('error', 'parse error')}", "malformed_json")
    problems = [_describe(err) for err in errors]
    return _reject(request, 422, "; ".join(problems), "invalid_schema", errors=problems)


def _describe(err: dict) -> str:
    where = ".".join(str(part) for part in err["loc"][1:]) or "body"
    if err["type"] == "extra_forbidden":
        return f"unknown field '{where}' (see /docs for the fields)"
    if err["type"] == "missing" and where == "body":
        return "body is missing: send a JSON object (see /docs)"
    return f"{where}: {err['msg']}"


@serve.deployment
@serve.ingress(api)
class Completer:
    def __init__(self, export: str, settings: dict[str, Any]):
        self.cfg = validate_config(ServingConfig, settings, "serving settings")
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.metrics = Metrics()
        _share(self.metrics, self.cfg.limits)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        started = time.perf_counter()
        self.served = ExportedModel(fetch_folder(export), device, self.cfg.limits.max_length)
        self.load_seconds = time.perf_counter() - started
        # One model call at a time: batching, not threads, is how a replica serves many callers.
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        # serve.batch's wrapper has these setters; its type stub does not say so.
        self._batched.set_max_batch_size(self.cfg.batching.max_batch_rows)  # pyright: ignore[reportAttributeAccessIssue]
        self._batched.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)  # pyright: ignore[reportAttributeAccessIssue]

    def check_health(self):
        if getattr(self, "served", None) is None:
            raise RuntimeError("model not loaded")
        # Ray stops exporting a gauge that is not set again; the health check comes regularly.
        self.metrics.load_seconds.set(self.load_seconds)

    @api.api_route("/v1/health", methods=["GET", "HEAD"], response_model=None)
    async def health(self, request: Request) -> dict | JSONResponse:
        problem = self._unusable()
        if problem:
            return _reject(request, 503, problem, "model_unusable")
        return {"status": "ok", "dataset": self.served.card.dataset}

    def _unusable(self) -> str | None:
        # Serve replaces a replica whose constructor fails, but an export that loads and then
        # computes NaN would answer garbage: it counts as not loaded, and a restart cannot fix it.
        if getattr(self, "served", None) is None:
            return "model not loaded"
        return self.served.problem

    @api.get("/v1/model", response_model=ModelCard)
    async def model_card(self) -> ModelCard:
        return self.served.card

    @api.post("/v1/complete", response_model=CompleteResponse, response_model_exclude_none=True)
    async def complete(self, body: CompleteRequest, request: Request) -> CompleteResponse | JSONResponse:
        problem = self._unusable()
        if problem:
            return _reject(request, 503, problem, "model_unusable")
        task = parse_request(body, self.served, self.cfg)
        if self.cfg.batching.enabled:
            samples = await self._batched(task)
        else:
            samples = (await self._run([task]))[0]
        self.metrics.samples.inc(task.num_samples)
        self.metrics.tokens.inc(task.num_samples * task.num_targets)
        return respond(task, samples, self.served)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _batched(self, tasks: list[Task]) -> list[torch.Tensor]:
        return await self._run(tasks)

    async def _run(self, tasks: list[Task]) -> list[torch.Tensor]:
        self.metrics.batch_rows.observe(_rows(tasks))
        self.metrics.batch_requests.observe(len(tasks))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._model_thread, complete_tasks, self.served.model, tasks, self.served.device
        )


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
    deployment options (num_replicas replaces autoscaling). Returns (app, run kwargs, http_options).
    """
    config = resolved_serve_config(path, export, overrides)
    (application,) = config["applications"]
    args = application["args"]
    (options,) = application.get("deployments") or [{"name": "Completer"}]
    options = {k: v for k, v in options.items() if k != "name"} | (deployment or {})
    if "num_replicas" in (deployment or {}):
        options.pop("autoscaling_config", None)
    export = str(args.get("export", ""))
    if not is_s3(export) and not (Path(export) / "model.json").is_file():
        raise ValueError(
            f"export {export!r} is not an export folder (no model.json); train one with `biglearn pretrain`"
        )
    run_kwargs = {"name": application["name"], "route_prefix": application.get("route_prefix", "/")}
    return _bind(args, options), run_kwargs, config.get("http_options", {})


def _bind(args: dict[str, Any], options: dict[str, Any]) -> serve.Application:
    unknown = set(args) - {"export", "settings"}
    if unknown or "export" not in args:
        raise ValueError(f"application args take 'export' (required) and 'settings'; got {sorted(args)}")
    settings = args.get("settings") or {}
    validate_config(ServingConfig, settings, "serving settings")  # fail at deploy time, not in the replica
    return Completer.options(**options).bind(str(args["export"]), settings)
