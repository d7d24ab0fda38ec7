"""The core modules (model, sampler, decoding, export, table tokens, serving) import without the cluster stack."""

from __future__ import annotations

import json
import subprocess
import sys

CORE = [
    "biglearn",
    "biglearn.config",
    "biglearn.roles",
    "biglearn.model",
    "biglearn.objectives",
    "biglearn.generation",
    "biglearn.gan",
    "biglearn.panel",
    "biglearn.export",
    "biglearn.data.table",
    "biglearn.serving",
    "biglearn.api",
    "biglearn.cli",
    "biglearn.transforms",
    "biglearn.simulate",
    "biglearn.simulate.modes",
    "biglearn.simulate.mixture",
    "biglearn.simulate.gmm25",
    "biglearn.simulate.landscape",
    "biglearn.simulate.figures",
    "biglearn.simulate.run",
]
HEAVY = ["ray", "deepspeed", "boto3", "botocore", "pyarrow"]

PROBE = """
import importlib, json, sys
heavy = {heavy!r}
report = {{}}
for name in {core!r}:
    importlib.import_module(name)
    report[name] = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print(json.dumps(report))
"""


def test_core_modules_do_not_import_the_cluster_stack():
    code = PROBE.format(heavy=HEAVY, core=CORE)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(report) == CORE
    # the first module after which a heavy package shows up is the culprit
    culprits = {name: loaded for name, loaded in report.items() if loaded}
    assert not culprits, culprits


def test_the_probe_would_see_a_heavy_import():
    # the data layer does use pyarrow: the same probe must notice it
    code = PROBE.format(heavy=HEAVY, core=["biglearn.data.manifest"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pyarrow" in json.loads(done.stdout.strip().splitlines()[-1])["biglearn.data.manifest"]
