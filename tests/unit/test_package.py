"""The wheel: what it holds, what it requires, and that its core runs outside the repository with
Ray, DeepSpeed and boto3 unavailable (loading an export, completing, the command line's help)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import biglearn

REPO = Path(__file__).resolve().parents[2]
CLUSTER_STACK = ("ray", "deepspeed", "boto3", "botocore", "sklearn", "pandas", "fastapi")
# A process in which the cluster stack cannot be imported, whatever the environment holds.
BLOCKED = f"import sys; sys.modules.update(dict.fromkeys({CLUSTER_STACK!r}))\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, target, follow_symlinks=False)
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("biglearn-*.whl")
    return wheel


def test_the_wheel_holds_the_serve_app_and_recipes_and_requires_only_the_core(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(archive.read(metadata).decode())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert {
        "biglearn/serve/app.py",
        "biglearn/serve/config.yaml",
        "biglearn/recipes/digits-quick.yaml",
        "biglearn/recipes/table.yaml",
        "biglearn/cli.py",
        "biglearn/py.typed",
    } <= names
    assert not any(name.startswith(("tests/", "jobs/", "benchmarks/")) for name in names)
    assert meta["Version"] == biglearn.__version__
    core = {r.split(">")[0].split("=")[0].split("[")[0] for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert core == {"torch", "numpy", "pydantic", "safetensors", "pyarrow", "pillow", "pyyaml"}
    assert {"train", "serve", "s3", "test"} <= set(meta.get_all("Provides-Extra"))
    assert "biglearn = biglearn.cli:main" in scripts


def test_the_installed_core_loads_an_export_and_completes_without_the_cluster_stack(wheel, export_folder, tmp_path):
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", BLOCKED + code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    used = run(
        "import biglearn\n"
        f"model = biglearn.load({str(export_folder)!r})\n"
        "out = model.complete({0: 3}, num_samples=2, seed=1)\n"
        "print(biglearn.__file__, out.samples.shape, out.samples[:, 0].tolist(), model.log_prob({0: 3, 1: 2}, [1]) < 0)\n"
    )
    assert used.split()[0].startswith(str(site)), "the installed wheel was used, not the checkout"
    assert used.split(maxsplit=1)[1].strip() == "(2, 16) [3, 3] True"
    helped = run("import sys; from biglearn.cli import main; sys.exit(main(['pretrain', '--help']))")
    assert "train.steps = 500" in helped and "cluster.zero_stage = 2" in helped
    recipes = run("from biglearn.cli import main; main(['recipes'])")
    assert "digits-quality" in recipes and str(site) in recipes
    # a command that needs an extra says which one
    serve = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKED + "import sys; from biglearn.cli import main; "
            f"sys.exit(main(['serve', '--export', {str(export_folder)!r}]))",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serve.returncode == 2 and "pip install 'biglearn[serve]'" in serve.stderr, serve.stderr


def test_code_and_recipes_carry_no_dated_measurements_or_issue_references():
    """Results live in docs/results.md and benchmarks/README.md with their commands and dates."""
    pattern = re.compile(r"\b20\d\d-\d\d(-\d\d)?\b|\bthe issue\b|\bissue \d+|(?<!docs/)\bmethod\.md")
    files = [
        p
        for folder in ("biglearn", "jobs", "cluster")
        for p in (REPO / folder).rglob("*")
        if p.suffix in {".py", ".yaml", ".yml"} or p.name == "Dockerfile"
    ]
    found = [
        f"{p.relative_to(REPO)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert len(files) > 40 and not found, found
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200 and "make pretrain" in readme and "make test" in readme
    assert not pattern.search(readme)
