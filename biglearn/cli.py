"""The `biglearn` command line (also `python -m biglearn`): one command per job.

    biglearn pretrain                                   # the quick recipe on the embedded digits
    biglearn pretrain --config digits-quality --set train.steps=2000
    biglearn pretrain --help                            # every config key with its default
    biglearn serve --export runs/digits-quick/export
    biglearn complete runs/digits-quick/export --values '{"0": 0, "1": 5}' --num-samples 2

`--config` takes a YAML path or the name of a packaged recipe (`biglearn recipes` lists them);
`--set KEY=VALUE` overrides one key; `--print-config` prints the resolved config and exits.
Exit status 2: a config, dataset or request that cannot be used (the message says why).
Each command imports what it needs when it runs, so `biglearn complete` and every `--help` work
with the core install (no Ray, no DeepSpeed).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from biglearn import __version__
from biglearn.config import Config, ConfigError, config_path, config_yaml, job_parser, load_config, recipe_names


def _about(command: Callable[[list[str]], int]) -> str:
    """A command's docstring as its --help description."""
    return inspect.cleandoc(command.__doc__ or "")


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _job_args(
    command: Callable[[list[str]], int],
    config_class: type[Config],
    set_example: str,
    argv: list[str],
    default: str | None = None,
) -> argparse.Namespace:
    """The options of a command run from a config (--config, --set, --print-config)."""
    where = "YAML path or recipe name" + (" (default: %(default)s)" if default else "")
    parser = job_parser(
        _about(command), where, set_example, default, config_class=config_class, prog=f"biglearn {command.__name__}"
    )
    return parser.parse_args(argv)


def _load(cls: type[Config], args: argparse.Namespace) -> Config | None:
    """The command's config; None when --print-config printed it (the command then stops)."""
    cfg = load_config(cls, args.config, args.set)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return None
    return cfg


# --- commands -------------------------------------------------------------------------------


def prepare(argv: list[str]) -> int:
    """Convert real formats (IDX, image folders, text, tables, mixtures) into a dataset: Parquet
    shards + manifest.json, locally or under s3://. Running it again completes an interrupted one.

    biglearn prepare --set source.kind=table --set source.files=my.csv --set output=data/my-table
    biglearn prepare --set source.kind=idx --set source.images=train-images-idx3-ubyte.gz \\
        --set source.labels=train-labels-idx1-ubyte.gz --set output=s3://bucket/datasets/mnist"""
    from biglearn.data.manifest import DatasetError
    from biglearn.data.prepare import PrepareConfig, prepare_dataset
    from biglearn.data.storage import StorageError

    args = _job_args(prepare, PrepareConfig, "source.kind=text", argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        cfg = _load(PrepareConfig, args)
        if cfg is None:
            return 0
        assert isinstance(cfg, PrepareConfig)
        manifest = prepare_dataset(cfg)
    except (ConfigError, DatasetError, StorageError) as exc:
        return _fail(exc)
    shape = f"V={manifest.vocab_size}" if manifest.kind == "discrete" else f"P={manifest.patch_dim}"
    splits = ", ".join(f"{split} {manifest.rows(split)}" for split in manifest.splits)
    print(f"[biglearn] {manifest.name}: {manifest.kind}, L={manifest.length}, {shape}; rows: {splits}; at {cfg.output}")
    return 0


def pretrain(argv: list[str]) -> int:
    """Pretrain a universal model with Ray Train + DeepSpeed, evaluate it and export it.
    Running the same command again (same run.name) resumes the run from its latest checkpoint.

    biglearn pretrain --config digits-quality --set train.steps=100
    ray job submit --working-dir . -- python jobs/pretrain.py --config digits-quality"""
    from biglearn.train.config import PretrainConfig

    args = _job_args(pretrain, PretrainConfig, "train.steps=50", argv, default="digits-quick")
    try:
        cfg = _load(PretrainConfig, args)
        if cfg is None:
            return 0
        assert isinstance(cfg, PretrainConfig)
        from biglearn.data.manifest import DatasetError
        from biglearn.train.evaluate import quality_report
        from biglearn.train.run import PretrainError
        from biglearn.train.run import pretrain as run_pretraining

        try:
            outcome = run_pretraining(cfg)
        except (DatasetError, PretrainError) as exc:
            return _fail(exc)
    except ConfigError as exc:
        return _fail(exc)

    summary = outcome.summary
    if "panel_nll" in summary:
        print("\n[biglearn] panel NLL per target token (validation):")
        for task, nll in summary["panel_nll"].items():
            print(f"  {task:<14} {nll:.4f}")
    else:
        print(
            "\n[biglearn] BigLearn-GAN panel (validation): RMS error of a sample's targets | RMS spread between two samples"
        )
        for task, scores in summary["generator_panel"].items():
            print(f"  {task:<14} {scores['error']:.4f} | {scores['spread']:.4f}")
    if "modes" in summary:
        modes = summary["modes"]
        print(
            f"[biglearn] joint samples cover {modes['modes_covered']}/{modes['modes']} modes; "
            f"{modes['high_quality']:.3f} of them within 3 standard deviations of a mode"
        )
    if "quality" in summary:
        print("\n".join(quality_report(summary, cfg.eval.guidance)))
        print(f"[biglearn] completions: {outcome.run_folder}/completions.png")
    print(f"[biglearn] export: {outcome.export}")
    return 0


def sweep(argv: list[str]) -> int:
    """Search the (S, T) schedule and optimiser of pretraining with Ray Tune (+ ASHA). Each trial is
    a pretraining run of the base recipe with sampled values; the same command (same name)
    resumes an interrupted sweep. Results: <storage>/<name>/results/ (trials.csv, best.yaml, sweep.png).

    biglearn sweep --config sweep-digits --set num_samples=4 --set name=try"""
    from biglearn.tune.config import SweepConfig

    args = _job_args(sweep, SweepConfig, "num_samples=4", argv, default="sweep-digits")
    try:
        from biglearn.data.manifest import DatasetError
        from biglearn.train.run import PretrainError
        from biglearn.tune.config import load_sweep

        config, base = load_sweep(args.config, args.set)
        if args.print_config:
            print(config_yaml(config), end="")
            return 0
        if "://" in config.storage:
            raise ConfigError("storage: sweeps write their results locally; give a folder (shared by all nodes)")
        from biglearn.tune.results import SCORES, write_results
        from biglearn.tune.sweep import objective_metric, run_sweep, sweep_folder

        grid = run_sweep(config, base, log=lambda line: print(line, flush=True))
    except (ConfigError, DatasetError, PretrainError) as exc:
        return _fail(exc)

    summary = write_results(grid, config, base, Path(sweep_folder(config)) / "results")
    print(f"\n[sweep] {len(summary.table)} trial(s): {summary.table.status.value_counts().to_dict()}")
    print(summary.table.drop(columns=[c for c in summary.table if c.startswith(SCORES)]).to_string(index=False))
    if summary.best is None:
        print("[sweep] no trial ran all its steps: no best schedule written", file=sys.stderr)
        return 1
    print(f"[sweep] best: trial {summary.best['trial']}, {objective_metric(config)} {summary.best['objective']:.4f}")
    print(f"[sweep] best schedule: {summary.folder / 'best.yaml'} (biglearn pretrain --config ...)")
    print(f"[sweep] table: {summary.folder / 'trials.csv'}, plot: {summary.folder / 'sweep.png'}")
    return 0


def simulate(argv: list[str]) -> int:
    """The paper's Gaussian-mixture simulations (25-GMM fits, 2-GMM landscapes), on CPU in minutes.
    Writes config.json, a PNG and results.json (last) into `output`.

    biglearn simulate --config gmm25-published --set gmm25.seeds=[1,2,3] --set output=runs/try"""
    from biglearn.simulate.run import SimulateConfig
    from biglearn.simulate.run import simulate as run_simulation

    args = _job_args(simulate, SimulateConfig, "gmm25.outer_steps=2000", argv, default="gmm25-published")
    try:
        cfg = _load(SimulateConfig, args)
    except ConfigError as exc:
        return _fail(exc)
    if cfg is None:
        return 0
    assert isinstance(cfg, SimulateConfig)
    try:
        result = run_simulation(cfg, log=lambda line: print(line, flush=True))
    except OSError as exc:
        return _fail(OSError(f"cannot write {cfg.output}: {exc}"))
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if cfg.experiment == "gmm25":
        print("seed    modes  reverse KL (se)    forward KL (se)")
        for run in result["per_seed"]:
            print(
                f"{run['seed']:<7} {run['modes_covered']:>2}/25  {run['reverse_kl']:7.3f} ({run['reverse_kl_se']:.3f})"
                f"   {run['forward_kl']:7.3f} ({run['forward_kl_se']:.3f})"
            )
        print(f"median modes covered {result['median_modes_covered']:g}; wall {result['wall_seconds']:.0f}s")
    else:
        print(f"collapsed minimum {result['collapsed_point']}; wall {result['wall_seconds']:.0f}s")
    print(f"[biglearn] results in {cfg.output}")
    return 0


def serve(argv: list[str]) -> int:
    """Serve an export over HTTP with Ray Serve (batching across callers, Prometheus metrics):
    starts a local Ray (or joins RAY_ADDRESS) and serves until Ctrl-C or SIGTERM.

    biglearn serve --export runs/digits-quick/export --set batching.max_batch_rows=128
    curl -s 127.0.0.1:8000/v1/complete -H 'content-type: application/json' \\
         -d '{"values": {"0": 0, "1": 5}, "target": "rest", "seed": 1}'"""
    from biglearn.serving import ServingConfig

    parser = job_parser(
        _about(serve),
        "Serve config file (default: the packaged one)",
        "limits.max_num_samples=4",
        config_class=ServingConfig,
        prog="biglearn serve",
    )
    parser.add_argument("--export", help="export folder or s3:// URI (default: the config's args.export)")
    parser.add_argument(
        "--metrics-port", type=int, default=8080, help="Prometheus endpoint of this node (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if not os.environ.get("RAY_ADDRESS"):
        # A new local Ray of its own: with this flag (read when ray is imported) Ray takes 127.0.0.1 as
        # the node address, so its agents, the metrics port and its internal servers listen on
        # loopback instead of every interface (docs/serving.md lists the ports).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from biglearn.serve.app import DEFAULT_CONFIG, app_from_config, resolved_serve_config

        path = config_path(args.config) if args.config else DEFAULT_CONFIG
        if args.print_config:
            print(yaml.safe_dump(resolved_serve_config(path, args.export, args.set), sort_keys=False), end="")
            return 0
        app, run_kwargs, http_options = app_from_config(path, args.export, args.set)
    except (ConfigError, ValueError, OSError) as exc:
        return _fail(exc)

    import ray
    from ray import serve as ray_serve

    from biglearn.data.storage import forwarded_env

    local = not os.environ.get("RAY_ADDRESS")  # else join that cluster
    ray.init(
        address="local" if local else None,
        _metrics_export_port=args.metrics_port,
        runtime_env={"env_vars": forwarded_env()},
    )
    # After ray.init, which installs a SIGTERM handler that aborts the process: SIGTERM (a process
    # manager, `ray job stop`, kill) stops us like Ctrl-C, and so does SIGINT when a shell started
    # us in the background (which makes us ignore it).
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, signal.default_int_handler)
    try:
        ray_serve.start(http_options=http_options)
        ray_serve.run(app, **run_kwargs)
        host, port = http_options.get("host", "127.0.0.1"), http_options.get("port", 8000)
        print(
            f"[biglearn] serving on http://{host}:{port}/v1 (docs: /docs); metrics: http://127.0.0.1:{args.metrics_port}/metrics",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[biglearn] stopping: shutting Serve down", flush=True)
        ray_serve.shutdown()
    return 0


def complete(argv: list[str]) -> int:
    """Complete examples with an export, in this process (no server), and print the answer as the
    HTTP endpoint gives it (JSON).

    biglearn complete runs/digits-quick/export --values '{"0": 0, "1": 5}' --num-samples 2 --seed 1
    biglearn complete runs/iris/export --values '{"sepal length (cm)": 5.1}' --target '["species"]'"""
    parser = argparse.ArgumentParser(
        prog="biglearn complete", description=_about(complete), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export", help="export folder or s3:// URI")
    parser.add_argument(
        "--values",
        default="{}",
        help="known values as JSON: {position: value}, a list with null, "
        "or {column: value} for a table model (default: none, a joint sample)",
    )
    parser.add_argument("--target", default="rest", help='"rest" or a JSON list of positions / column names')
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU when there is one)")
    for name, kind, help_text in (
        ("steps", int, "decoding steps"),
        ("order", str, "random or confidence"),
        ("temperature", float, None),
        ("top-k", int, None),
        ("guidance", float, None),
    ):
        parser.add_argument(f"--{name}", type=kind, default=None, help=help_text)
    args = parser.parse_args(argv)
    from pydantic import ValidationError

    from biglearn.api import load
    from biglearn.export import ExportError
    from biglearn.serving import RequestError

    try:
        values = json.loads(args.values)
        target = args.target if args.target == "rest" else json.loads(args.target)
    except json.JSONDecodeError as exc:
        return _fail(ValueError(f"--values and --target take JSON: {exc}"))
    decoding = {
        key: getattr(args, key)
        for key in ("steps", "order", "temperature", "top_k", "guidance")
        if getattr(args, key) is not None
    }
    try:
        model = load(args.export, device=args.device)
        completion = model.complete(values, target, num_samples=args.num_samples, seed=args.seed, **decoding)
    except (ExportError, RequestError, ValidationError, ValueError, OSError) as exc:
        return _fail(exc)
    print(completion.response.model_dump_json(exclude_none=True, indent=1))
    return 0


def recipes(argv: list[str]) -> int:
    """List the recipes shipped with the package (names for --config) and where they are."""
    from biglearn.config import RECIPES

    argparse.ArgumentParser(prog="biglearn recipes", description=_about(recipes)).parse_args(argv)
    for name in recipe_names():
        header = (RECIPES / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:<22} {header}")
    print(f"\n(in {RECIPES})")
    return 0


# The extra that brings what a command imports when it runs (biglearn's core has none of these).
COMMAND_EXTRAS = {"prepare": "train", "pretrain": "train", "sweep": "train", "serve": "serve"}
S3_MODULES = ("boto3", "botocore")

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "prepare": prepare,
    "pretrain": pretrain,
    "sweep": sweep,
    "simulate": simulate,
    "serve": serve,
    "complete": complete,
    "recipes": recipes,
}


def usage() -> str:
    lines = [f"usage: biglearn <command> [options]     (biglearn {__version__})", "", "commands:"]
    for name, command in COMMANDS.items():
        summary = " ".join((command.__doc__ or "").split()).split(". ")[0].split(":")[0]
        lines.append(f"  {name:<10} {summary}")
    lines += ["", "`biglearn <command> --help` lists the command's options and every config key."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(__version__)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        extra = "s3" if missing in S3_MODULES else COMMAND_EXTRAS.get(argv[0])
        if extra is None or missing.startswith("biglearn"):
            raise
        print(
            f"error: `biglearn {argv[0]}` needs {missing}, which the [{extra}] extra installs: "
            f"pip install 'biglearn[{extra}]'",
            file=sys.stderr,
        )
        return 2
