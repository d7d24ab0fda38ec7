"""Serve under load: requests/s and latency with batching on vs off, next to the bare model call,
and beside Ray Serve's own batching (`serve.batch`), which biglearn's Batcher replaced.

    python benchmarks/serve_load.py                          # untrained, digits-quick size
    python benchmarks/serve_load.py --size small             # d_model 64, 2 layers
    python benchmarks/serve_load.py --export runs/digits-quick/export --requests 300
    python benchmarks/serve_load.py --gpu                    # the replica and the in-process call on one GPU
    python benchmarks/serve_load.py --steps 16 8             # two decoding step counts in one run

One local Ray, one Completer replica behind the gateway (1 CPU, 1 torch thread, access log off;
with --gpu also 1 GPU), loopback only. For each concurrency, that
many asyncio clients send half-image completions (top half given, --steps decoding steps) until
--requests are answered or --seconds pass. The in-process rows run the same requests through
biglearn.serving directly, `concurrency` of them per model call (perfect batching, no HTTP), and
show the share of that call spent in the model's forward passes.
"""

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from biglearn.export import write_export
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from biglearn.serve.app import Completer, Gateway, app_from_config, resolved_serve_config
from biglearn.serving import CompleteRequest, ExportedModel, ServingConfig, complete_tasks, parse_request

CONCURRENCY = (1, 8, 32)
MODES = ("on", "serve.batch", "off")  # biglearn's Batcher, Ray Serve's serve.batch, no batching


def body(seed: int, steps: int) -> dict:
    return {"values": {str(i): (i * 7) % 17 for i in range(32)}, "target": "rest", "seed": seed, "steps": steps}


SIZES = {"quick": (128, 4, 4), "small": (64, 2, 4), "tiny": (32, 1, 2)}  # d_model, layers, heads


def random_export(folder: Path, size: str) -> str:
    """Untrained weights of a digits model (`quick` = the digits-quick recipe's architecture):
    serving cost does not depend on the weights."""
    d_model, num_layers, num_heads = SIZES[size]
    spec = ModelSpec(
        model=ModelConfig(d_model=d_model, num_layers=num_layers, num_heads=num_heads),
        length=64,
        vocab_size=17,
        grid=(8, 8),
    )
    manifest = {
        "name": "digits",
        "kind": "discrete",
        "length": 64,
        "vocab_size": 17,
        "geometry": {"height": 8, "width": 8},
    }
    write_export(folder, UniversalTransformer(spec).state_dict(), spec, manifest, {"benchmark": True})
    return str(folder)


def serve_batch_app(export: str, overrides: list[str], deployment: dict):
    """The served application with Ray Serve's `serve.batch` in the Completer instead of
    biglearn's Batcher: the baseline. serve.batch forms the next batch while a call still runs."""
    from ray import serve

    class ServeBatchCompleter(Completer.func_or_class):
        def __init__(self, export: str, settings: dict):
            super().__init__(export, settings)
            self.batcher = self
            self.ray_batched.set_max_batch_size(self.cfg.batching.max_batch_rows)
            self.ray_batched.set_batch_wait_timeout_s(self.cfg.batching.batch_wait_timeout_s)

        async def submit(self, task):
            return await self.ray_batched(task)

        @serve.batch(batch_size_fn=lambda tasks: sum(task.num_samples for task in tasks))
        async def ray_batched(self, tasks):
            return await self.run_batch(tasks)

    (application,) = resolved_serve_config(export=export, overrides=overrides)["applications"]
    settings = application["args"]["settings"]
    (gateway,) = [
        {k: v for k, v in d.items() if k != "name"} for d in application["deployments"] if d["name"] == "Gateway"
    ]
    completer = serve.deployment(ServeBatchCompleter, name="Completer").options(**deployment).bind(export, settings)
    return Gateway.options(**gateway).bind(completer, settings)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load(url: str, concurrency: int, max_requests: int, max_seconds: float, steps: int) -> dict:
    """`concurrency` clients on one asyncio loop (a light client: threads would take CPU from the
    server on a small machine), each sending its next request when the last is answered."""
    return asyncio.run(_load(url, concurrency, max_requests, max_seconds, steps))


async def _load(url: str, concurrency: int, max_requests: int, max_seconds: float, steps: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    failures: list[float] = []
    issued = iter(range(max_requests))
    deadline = time.monotonic() + max_seconds

    async def client(session):
        for seed in issued:
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            async with session.post(url, json=body(seed, steps)) as response:
                await response.read()
            (latencies if response.status == 200 else failures).append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "rps": len(latencies) / wall,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "n": len(latencies),
        "failed": len(failures),
    }


def in_process(export: str, concurrency: int, repeats: int, device: str, steps: int) -> dict:
    """The same requests through biglearn.serving, `concurrency` per model call; also the share
    of a call spent in the model's forward passes (the rest: request handling, noise, sampling)."""
    served = ExportedModel(export, device)
    cfg = ServingConfig()
    forward_seconds = [0.0]
    started_forward = [0.0]

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()  # time the kernels, not their launches

    def before(*_):
        synchronize()
        started_forward[0] = time.perf_counter()

    def after(*_):
        synchronize()
        forward_seconds[0] += time.perf_counter() - started_forward[0]

    served.model.register_forward_pre_hook(before)
    served.model.register_forward_hook(after)
    times, forward_shares = [], []
    for r in range(repeats):
        tasks = [
            parse_request(CompleteRequest(**body(r * concurrency + i, steps)), served, cfg) for i in range(concurrency)
        ]
        forward_seconds[0] = 0.0
        started = time.perf_counter()
        complete_tasks(served.model, tasks, served.device)
        times.append(time.perf_counter() - started)
        forward_shares.append(forward_seconds[0] / times[-1])
    return {
        "rps": concurrency / percentile(times, 0.5),
        "p50": percentile(times, 0.5),
        "p99": percentile(times, 0.99),
        "n": repeats * concurrency,
        "failed": 0,
        "forward_share": percentile(forward_shares, 0.5),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="export folder (default: an untrained model of --size)")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="quick", help="model size without --export (default: %(default)s)"
    )
    parser.add_argument("--requests", type=int, default=240, help="most requests per cell (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=15, help="most seconds per cell (default: %(default)s)")
    parser.add_argument("--gpu", action="store_true", help="give the replica a GPU, and run the in-process call on it")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[16],
        help="decoding steps per request, each measured in turn (default: %(default)s, the served default)",
    )
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu: torch sees no CUDA GPU on this machine")
    device = "cuda" if args.gpu else "cpu"
    torch.set_num_threads(1)
    export = args.export or random_export(Path(tempfile.mkdtemp()) / "export", args.size)

    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/complete"
    results = {}
    deployment = {
        "num_replicas": 1,
        "max_ongoing_requests": 32,
        "max_queued_requests": -1,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if args.gpu else 0},
        "logging_config": {"enable_access_log": False},
    }
    for mode in MODES:
        overrides = [f"batching.enabled={str(mode != 'off').lower()}", "batching.max_batch_rows=32", "torch_threads=1"]
        app, run_kwargs, _ = app_from_config(export=export, overrides=overrides, deployment=deployment)
        if mode == "serve.batch":
            app = serve_batch_app(export, overrides, deployment)
        serve.run(app, **run_kwargs)
        load(url, 4, 16, 30, args.steps[0])  # warm-up: first calls pay for lazy initialisation
        for steps in args.steps:
            for c in CONCURRENCY:
                results[(mode, steps, c)] = load(url, c, args.requests, args.seconds, steps)
        serve.delete(run_kwargs["name"])
    serve.shutdown()
    ray.shutdown()
    for steps in args.steps:
        for c in CONCURRENCY:
            results[("model", steps, c)] = in_process(export, c, max(3, 48 // c), device, steps)

    for steps in args.steps:
        print(
            f"\n{steps} decoding steps\n"
            "concurrency | batching on: req/s  p50 ms  p99 ms | serve.batch: req/s  p50 ms  p99 ms "
            "| batching off: req/s  p50 ms  p99 ms | in-process call: req/s  ms/call  forward | on/serve.batch  on/off"
        )
        for c in CONCURRENCY:
            on, ray_batched, off, model = (results[(mode, steps, c)] for mode in (*MODES, "model"))
            cells = [
                f"{r['rps']:>{width}.1f} {r['p50'] * 1e3:>7.1f} {r['p99'] * 1e3:>7.1f}"
                for r, width in ((on, 17), (ray_batched, 17), (off, 18))
            ]
            print(
                f"{c:>11} | " + " | ".join(cells) + " | "
                f"{model['rps']:>21.1f} {model['p50'] * 1e3:>8.1f} {100 * model['forward_share']:>7.0f}% | "
                f"{on['rps'] / ray_batched['rps']:>13.2f}x {on['rps'] / off['rps']:>5.2f}x"
            )
        overhead = results[("on", steps, 1)]["p50"] - results[("model", steps, 1)]["p50"]
        print(f"Serve overhead at concurrency 1 (p50, batching on, minus the in-process call): {overhead * 1e3:.1f} ms")
        before, after = (results[(mode, steps, 32)]["rps"] for mode in ("serve.batch", "on"))
        slow, fast = (results[(mode, steps, 1)]["p50"] * 1e3 for mode in ("serve.batch", "on"))
        print(
            f"serve.batch -> Batcher, {steps} steps: {before:.1f} -> {after:.1f} req/s at concurrency 32 "
            f"({after / before:.2f}x), p50 {slow:.1f} -> {fast:.1f} ms at concurrency 1"
        )
    first, *others = args.steps
    for steps in others:
        before, after = (results[("on", n, 32)]["rps"] for n in (first, steps))
        slow, fast = (results[("on", n, 1)]["p50"] * 1e3 for n in (first, steps))
        print(
            f"{first} -> {steps} steps, batching on: {before:.1f} -> {after:.1f} req/s at concurrency 32 "
            f"({after / before:.2f}x), p50 {slow:.1f} -> {fast:.1f} ms at concurrency 1"
        )
    failed = sum(r["failed"] for r in results.values())
    counts = ", ".join(f"{mode}@{steps}/{c}={r['n']}" for (mode, steps, c), r in results.items() if mode != "model")
    print(f"failed requests: {failed}; requests per cell (mode@steps/concurrency): {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
