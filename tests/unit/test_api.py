"""The Python API (`biglearn.load`) and the command line: the same answers as the server's code,
numpy and PIL in and out, log-probabilities, and a CLI whose help comes from the typed configs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import biglearn
from biglearn.generation import decoding_nll
from biglearn.roles import SOURCE, TARGET
from biglearn.serving import CompleteRequest, ExportedModel, ServingConfig, complete_tasks, parse_request, respond
from tests.unit.conftest import H, L, V, W


@pytest.fixture(scope="module")
def model(export_folder) -> biglearn.Model:
    return biglearn.load(export_folder, device="cpu")


def server_answer(folder, body: dict) -> dict:
    """What the HTTP endpoint's code answers (biglearn.serving, default settings)."""
    served, cfg = ExportedModel(folder), ServingConfig()
    task = parse_request(CompleteRequest.model_validate(body), served, cfg)
    (samples,) = complete_tasks(served.model, [task], served.device)
    return json.loads(respond(task, samples, served).model_dump_json(exclude_none=True))


def test_complete_answers_what_the_server_answers_and_keeps_the_given_values(model, export_folder):
    out = model.complete({0: 3, 5: 1}, target="rest", num_samples=3, seed=4, steps=4)
    assert biglearn.__version__ and isinstance(out.samples, np.ndarray) and out.samples.shape == (3, L)
    assert (out.samples[:, 0] == 3).all() and (out.samples[:, 5] == 1).all()
    assert ((out.samples >= 0) & (out.samples < V)).all()
    body = {"values": {"0": 3, "5": 1}, "num_samples": 3, "seed": 4, "steps": 4}
    assert json.loads(out.response.model_dump_json(exclude_none=True)) == server_answer(export_folder, body)
    assert np.array_equal(model.complete({0: 3, 5: 1}, num_samples=3, seed=4, steps=4).samples, out.samples)
    assert not np.array_equal(model.complete({0: 3, 5: 1}, num_samples=3, seed=5, steps=4).samples, out.samples)
    assert model.card.length == L and out.estimate is None
    assert model.complete(num_samples=2, seed=1).samples.shape == (2, L)  # nothing given: joint samples


def test_numpy_and_pil_images_in_and_out(model):
    image_HW = (np.arange(L).reshape(H, W) % V).astype(np.int64)
    known_HW = np.zeros((H, W), dtype=bool)
    known_HW[: H // 2] = True  # the top half is given
    from_array = model.complete(image_HW, mask=known_HW, num_samples=2, seed=1)
    assert (from_array.samples[:, : L // 2] == image_HW.reshape(-1)[: L // 2]).all()
    grey = Image.fromarray(np.rint(image_HW * 255 / (V - 1)).astype(np.uint8), mode="L")
    from_image = model.complete(grey, mask=known_HW, num_samples=2, seed=1)
    assert np.array_equal(from_image.samples, from_array.samples)
    assert [image.size for image in from_image.images] == [(W, H)] * 2
    back = np.rint(np.asarray(from_image.images[0], dtype=float) * (V - 1) / 255).astype(int)
    assert np.array_equal(back.reshape(-1), from_image.samples[0])
    with pytest.raises(ValueError, match="give `mask`"):
        model.complete(image_HW)


def test_log_prob_scores_the_targets_given_the_sources(model):
    values = {0: 3, 1: 0, 5: 2, 6: 4}
    one_pass = model.log_prob(values, target=[5, 6], steps=1)
    roles_L = torch.zeros(L, dtype=torch.int8)
    roles_L[[0, 1]], roles_L[[5, 6]] = SOURCE, TARGET
    values_L = torch.zeros(L, dtype=torch.long)
    values_L[[0, 1, 5, 6]] = torch.tensor([3, 0, 2, 4])
    with torch.no_grad():
        logp_LV = model.served.model(values_L[None], roles_L[None])[0].float().log_softmax(-1)
    assert one_pass == pytest.approx(float(logp_LV[5, 2] + logp_LV[6, 4]), abs=1e-5)
    chain = model.log_prob(values, target=[5, 6], seed=3)
    expected = -float(
        decoding_nll(model.served.model, values_L[None], roles_L[None], torch.Generator().manual_seed(3), 2)[0]
    )
    assert chain == pytest.approx(expected, abs=1e-5) and chain < 0
    # a likelier value scores higher: the model's most probable value at 5 against its least
    best, worst = int(logp_LV[5].argmax()), int(logp_LV[5].argmin())
    assert model.log_prob({0: 3, 1: 0, 5: best}, [5], steps=1) > model.log_prob({0: 3, 1: 0, 5: worst}, [5], steps=1)
    with pytest.raises(ValueError, match="targets without a value"):
        model.log_prob({0: 3}, target=[5])
    with pytest.raises(ValueError, match="list the positions"):
        model.log_prob({0: 3}, target="rest")


def test_a_table_model_speaks_column_names(table_export_folder):
    model = biglearn.load(table_export_folder)
    out = model.complete({"age": 40, "city": "Oslo"}, target=["income", "smoker"], num_samples=4, seed=2)
    assert len(out.samples) == 4 and all(row["age"] == 40 and row["city"] == "Oslo" for row in out.samples)
    assert all(isinstance(row["smoker"], bool) and row["income"] > 0 for row in out.samples)
    assert set(out.estimate) == {"income", "smoker"} and out.images is None
    assert model.log_prob({"age": 40, "city": "Oslo", "smoker": True}, target=["smoker"], steps=1) < 0
    with pytest.raises(ValueError, match="not a category"):
        model.complete({"city": "Paris"})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biglearn", *args], capture_output=True, text=True, timeout=120)


def test_the_command_line_lists_keys_prints_configs_and_completes(export_folder):
    helped = run_cli("pretrain", "--help")
    assert helped.returncode == 0
    # every key of the typed config, with the default recipe's value and its docstring's first sentence
    assert "recipe digits-quick" in helped.stdout and "train.steps = 500" in helped.stdout
    assert "optim.batch_size = 64" in helped.stdout and "train.tracker = none" in helped.stdout
    assert "Global batch per optimizer step" in helped.stdout
    printed = run_cli("pretrain", "--config", "digits-quality", "--set", "train.steps=7", "--print-config")
    assert printed.returncode == 0 and "steps: 7" in printed.stdout and "name: digits-quality" in printed.stdout
    unknown = run_cli("pretrain", "--config", "no-such-recipe")
    assert unknown.returncode == 2 and "digits-quick" in unknown.stderr  # the recipes are listed
    bad_key = run_cli("pretrain", "--set", "train.stepz=3", "--print-config")
    assert bad_key.returncode == 2 and "unknown key 'train.stepz'" in bad_key.stderr
    completed = run_cli("complete", str(export_folder), "--values", '{"0": 3}', "--num-samples", "2", "--steps", "4")
    assert completed.returncode == 0, completed.stderr
    answer = json.loads(completed.stdout)
    assert len(answer["samples"]) == 2 and all(s["values"][0] == 3 for s in answer["samples"]) and answer["steps"] == 4
    refused = run_cli("complete", str(export_folder), "--values", '{"0": 99}')
    assert refused.returncode == 2 and "outside the vocabulary" in refused.stderr


def test_every_config_key_has_a_description_for_help():
    from biglearn.config import config_entries
    from biglearn.data.prepare import PrepareConfig
    from biglearn.serving import ServingConfig
    from biglearn.simulate.run import SimulateConfig
    from biglearn.train.config import PretrainConfig
    from biglearn.tune.config import SweepConfig

    for cls in (PretrainConfig, ServingConfig, SweepConfig, SimulateConfig, PrepareConfig):
        entries = config_entries(cls)
        bare = [key for key, _, description in entries if not re.sub(r"^\[\w+\] ", "", description)]
        assert len(entries) > 5 and not bare, (cls.__name__, bare)
    # a dataset source lists each kind's own keys
    keys = {key: description for key, _, description in config_entries(PrepareConfig)}
    assert keys["source.kind"].startswith("one of: idx, images, text, digits, gmm, table")
    assert keys["source.bins"].startswith("[table] ")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_model_loaded_on_a_gpu_completes_and_scores(export_folder):
    model = biglearn.load(export_folder, device="cuda")
    assert next(model.served.model.parameters()).is_cuda
    out = model.complete({0: 3, 5: 1}, num_samples=3, seed=4, steps=4)
    assert out.samples.shape == (3, L) and (out.samples[:, 0] == 3).all() and (out.samples[:, 5] == 1).all()
    on_cpu = biglearn.load(export_folder, device="cpu").log_prob({0: 3, 1: 0, 5: 2}, [5], steps=1)
    assert model.log_prob({0: 3, 1: 0, 5: 2}, [5], steps=1) == pytest.approx(on_cpu, abs=1e-3)
