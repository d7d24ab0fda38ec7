"""One simulation run: the typed config of jobs/simulate_gmm.py and the run that writes its folder.

The output folder holds config.json (the resolved config, written first), a PNG (fit.png for
the 25-GMM, landscape.png for the 2-GMM) and results.json, written last: a folder without
results.json holds no finished run. Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import PositiveInt, model_validator

from biglearn.config import Config
from biglearn.simulate import figures
from biglearn.simulate.gmm25 import Gmm25Config, train_gmm25
from biglearn.simulate.landscape import OBJECTIVES, LandscapeConfig, study
from biglearn.simulate.mixture import paper_modes

RESULTS = "results.json"
SECTIONS = {"gmm25": "gmm25", "gmm2-landscape": "landscape"}


class SimulateConfig(Config):
    experiment: Literal["gmm25", "gmm2-landscape"]
    """Simulation to run: gmm25 (reads section gmm25) or gmm2-landscape (reads landscape)."""
    output: str
    """Local folder the run writes to; created when missing."""
    threads: PositiveInt = 1
    """torch intra-op threads (tiny tensors: 1 is fastest on a shared box)."""
    gmm25: Gmm25Config = Gmm25Config()
    landscape: LandscapeConfig = LandscapeConfig()

    @model_validator(mode="after")
    def _check(self) -> SimulateConfig:
        used = SECTIONS[self.experiment]
        stray = [name for name in SECTIONS.values() if name != used and name in self.model_fields_set]
        if stray:
            raise ValueError(f"section '{stray[0]}' is set but experiment is {self.experiment} (it reads '{used}')")
        return self


def simulate(cfg: SimulateConfig, log: Callable[[str], None] = print) -> dict:
    """Runs cfg.experiment, writes the output folder, returns what results.json holds."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).unlink(missing_ok=True)  # an interrupted re-run must not leave the old verdict
    _write_json(out / "config.json", cfg.model_dump(mode="json"))
    torch.set_num_threads(cfg.threads)
    env = {"torch": torch.__version__, "threads": cfg.threads, "machine": platform.machine(), "cpus": os.cpu_count()}
    if cfg.experiment == "gmm25":
        result = train_gmm25(cfg.gmm25, log)
        modes, _ = paper_modes("gmm25")
        title = f"25-GMM reverse KL, {cfg.gmm25.outer_steps} x {cfg.gmm25.inner_steps} steps: {out.name}"
        figures.fit_panels(out / "fit.png", modes.numpy(), result["per_seed"], cfg.gmm25.eval.radius, title)
    else:
        result = study(cfg.landscape, log)
        panels = [
            {
                "name": name,
                "values": result["objectives"][name]["grid"],
                "paths": [[tuple(p) for p in result["objectives"][name]["descent"]["path"]]],
            }
            for name in OBJECTIVES
        ]
        marks = [tuple(result["optimum"]), tuple(reversed(result["optimum"]))]
        title = "2-GMM reverse-KL landscapes over (mu1, mu2): red = optima, orange -> blue = descent from the collapsed minimum"
        figures.heat_maps(out / "landscape.png", panels, cfg.landscape.low, cfg.landscape.high, marks, title)
    result = {"experiment": cfg.experiment, "environment": env, **result}
    _write_json(out / RESULTS, result)
    return result


def _write_json(path: Path, payload: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1))
    partial.replace(path)
