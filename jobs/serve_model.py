"""Serve an export over HTTP with Ray Serve: conditional generation with batching and metrics.

    python jobs/serve_model.py                                         # runs/digits-quick/export
    python jobs/serve_model.py --export s3://bucket/runs/x/export --set batching.max_batch_rows=128
    curl -s localhost:8000/v1/complete -H 'content-type: application/json' \
         -d '{"values": {"0": 0, "1": 5}, "target": "rest", "seed": 1}'

Starts a local Ray with the Prometheus endpoint on --metrics-port (`serve run` cannot), deploys
serve/config.yaml and serves until Ctrl-C. Settings keys: biglearn.serving.ServingConfig.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `serve/` is the repository's folder, not an installed package

from biglearn.config import ConfigError, job_parser  # noqa: E402
from biglearn.data.storage import forwarded_env  # noqa: E402
from serve.app import DEFAULT_CONFIG, app_from_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = job_parser(__doc__, "Serve config (default: %(default)s)", "limits.max_num_samples=4", str(DEFAULT_CONFIG))
    parser.add_argument("--export", help="export folder or s3:// URI (default: the config's args.export)")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus endpoint of this node (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        app, run_kwargs, http_options = app_from_config(args.config, args.export, args.set)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    # Replicas import `serve.app` from this checkout and reach the same object store as we do.
    env_vars = {"PYTHONPATH": str(REPO), **forwarded_env()}
    ray.init(_metrics_export_port=args.metrics_port, runtime_env={"env_vars": env_vars})
    # After ray.init, which installs a SIGTERM handler that aborts the process: SIGTERM (a process
    # manager, `ray job stop`, kill) stops us like Ctrl-C, and so does SIGINT when a shell started
    # us in the background (which makes us ignore it).
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.default_int_handler)
    try:
        serve.start(http_options=http_options)
        serve.run(app, **run_kwargs)
        host, port = http_options.get("host", "127.0.0.1"), http_options.get("port", 8000)
        print(f"[biglearn] serving on http://{host}:{port}/v1 (docs: /docs); metrics: http://127.0.0.1:{args.metrics_port}/metrics")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[biglearn] stopping: shutting Serve down", flush=True)
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
