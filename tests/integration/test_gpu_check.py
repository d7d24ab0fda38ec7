"""The prepared GPU check, run in its dry mode (on CPU, smallest sizes) so that it cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.ray


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=env)


def test_the_gpu_check_runs_every_step_in_its_dry_mode(tmp_path):
    refused = gpu_check("--dry-run")
    assert refused.returncode == 2 and "--out FILE" in refused.stderr
    kept = tmp_path / "kept.txt"
    kept.write_text("earlier figures")
    refused = gpu_check("--dry-run", "--out", str(kept))
    assert refused.returncode == 2 and "exists and is kept" in refused.stderr
    assert kept.read_text() == "earlier figures"

    figures = tmp_path / "figures" / "gpu_check.txt"
    done = gpu_check("--dry-run", "--out", str(figures))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = figures.read_text()
    assert "DRY RUN on CPU" in text.splitlines()[0]
    headings = re.findall(r"^== (.+)$", text, flags=re.M)
    assert headings == [
        "GPU tests",
        "bf16 training and MFU, tiny model",
        "bf16 training and MFU, tiny model, ZeRO-2",
        "the same, ZeRO-3",
        "serving",
    ]
    pairs = re.findall(r"^pair 1: bare PyTorch loop .* MFU (\S+)%; Ray Train \+ DeepSpeed .* MFU (\S+)%", text, re.M)
    assert len(pairs) == 3 and all(0 < float(mfu) < 100 for pair in pairs for mfu in pair)
    assert re.search(r"Ray run ZeRO-3; MFU against", text)
    assert re.search(r"^ +32 \|", text, re.M) and "failed requests: 0" in text
    assert text.rstrip().endswith(f"figures in {figures}")
