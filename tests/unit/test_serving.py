"""Serving without the server: request checks, batching independence, PNGs, the export card."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import astuple

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from biglearn.config import ConfigError, validate_config
from biglearn.export import write_export
from biglearn.generation import complete
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from biglearn.request_schema import position_pattern, request_schema
from biglearn.roles import ABSENT, SOURCE, TARGET
from biglearn.serving import (
    CompleteRequest,
    ExportedModel,
    RequestError,
    ServingConfig,
    complete_tasks,
    decode_png,
    encode_png,
    parse_request,
    respond,
)
from tests.unit.conftest import H, L, V, W

CFG = ServingConfig(limits={"max_num_samples": 8, "max_steps": 8}, decoding={"steps": 4})


@pytest.fixture(scope="module")
def served(export_folder) -> ExportedModel:
    return ExportedModel(export_folder)


def task(served, **fields):
    return parse_request(CompleteRequest(**fields), served, CFG)


def png(array_HW: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array_HW.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- the card -----------------------------------------------------------------------------------


def test_card_describes_the_export(served, tmp_path):
    card = served.card
    assert (card.dataset, card.kind, card.length, card.vocab_size, card.png) == ("toy", "discrete", L, V, True)
    assert card.geometry == {"height": H, "width": W} and card.panel == {"panel_nll": {"joint": 1.5}}
    assert card.carries_training_data  # its memory holds training rows
    assert served.problem is None
    # the hash is of the content, not of the file's formatting
    other = tmp_path / "other"
    write_export(
        other,
        served.model.state_dict(),
        served.spec,
        {"name": "toy", "kind": "discrete"},
        {"seed": 1, "run": {"name": "toy"}},
    )
    assert ExportedModel(other).card.config_sha256 == card.config_sha256
    write_export(other, served.model.state_dict(), served.spec, {"name": "toy", "kind": "discrete"}, {"seed": 2})
    assert ExportedModel(other).card.config_sha256 != card.config_sha256
    assert ExportedModel(other).card.png is False  # no geometry: no PNG mapping


def test_export_with_broken_weights_is_flagged(served, tmp_path):
    state = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in served.model.state_dict().items()
    }
    write_export(tmp_path, state, served.spec, {"name": "toy", "kind": "discrete"}, {})
    assert "not finite" in ExportedModel(tmp_path).problem


def test_overlong_model_is_refused(export_folder):
    assert ExportedModel(export_folder, max_length=L).spec.length == L
    with pytest.raises(ValueError, match="max_length"):
        ExportedModel(export_folder, max_length=L - 1)


# --- requests -----------------------------------------------------------------------------------


def test_list_and_map_forms_give_the_same_task(served):
    listed = task(served, values=[3, None, 4] + [None] * (L - 3), target=[1, 5])
    mapped = task(served, values={0: 3, 2: 4}, target=[1, 5])
    assert torch.equal(listed.roles_L, mapped.roles_L) and torch.equal(listed.values, mapped.values)
    roles = listed.roles_L.tolist()
    assert roles[0] == roles[2] == SOURCE and roles[1] == roles[5] == TARGET
    assert roles.count(ABSENT) == L - 4
    rest = task(served, values={0: 3}, target="rest")
    assert (rest.roles_L == TARGET).sum() == L - 1 and rest.num_targets == L - 1


def test_json_keys_of_the_map_are_positions(served):
    request = CompleteRequest.model_validate_json('{"values": {"0": 1, "7": 2}}')
    assert (parse_request(request, served, CFG).roles_L == SOURCE).nonzero()[:, 0].tolist() == [0, 7]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"values": [1, 2]}, f"values has 2 entries; this model takes exactly {L}"),
        ({"values": {0: V}}, f"values[0] = {V} is outside the vocabulary 0..{V - 1}"),
        ({"values": {0: 1.5}}, "values[0] = 1.5 is not a token id"),
        ({"values": {0: [1, 2]}}, "values[0] = [1.0, 2.0] is not a token id"),
        ({"values": {3: -1}}, "values[3] = -1 is outside the vocabulary"),
        ({"values": {L: 1}}, f"positions [{L}] are outside 0..{L - 1}"),
        ({"values": {0: 1}, "target": []}, "target is empty"),
        ({"values": {0: 1}, "target": [1, 1]}, "more than once"),
        ({"values": {0: 1}, "target": [L + 3]}, "target: positions"),
        ({"values": {0: 1}, "num_samples": 9}, "at most 8"),
        ({"values": {0: 1}, "steps": 9}, "at most 8"),
        ({"values": {0: 1}, "image": {"png": "x"}}, "not both"),
        ({"image": {"png": "not base64!"}}, "image.png: not a base64-encoded PNG"),
    ],
)
def test_bad_requests_say_what_to_fix(served, fields, message):
    with pytest.raises(RequestError) as err:
        task(served, **fields)
    assert message in str(err.value)


def test_given_targets_stay_given_and_whole_numbers_may_be_written_as_decimals(served):
    """JSON Schema reads 2.0 as the integer 2; a position both given and a target keeps its value;
    null is unknown in both forms of `values`; nothing left to generate returns the given values."""
    request = CompleteRequest.model_validate_json('{"values": {"0": 3.0, "1": null}, "target": [0, 1], "steps": 2.0}')
    overlap = parse_request(request, served, CFG)
    assert overlap.roles_L.tolist()[:2] == [SOURCE, TARGET] and overlap.decoding.steps == 2
    everything = task(served, values=[1] * L)
    (samples,) = complete_tasks(served.model, [everything], served.device)
    assert everything.num_targets == 0 and samples.tolist() == [[1] * L]


@pytest.mark.parametrize(
    "body",
    [
        '{"values": {"0": 1}, "colour": "red"}',  # unknown field
        '{"values": {"0": 1}, "temperature": NaN}',  # non-finite number
        '{"values": {"0": 1}, "temperature": Infinity}',
        '{"values": {"0": 1}, "num_samples": 0}',
        '{"values": {"0": 1}, "order": "sideways"}',
        '{"values": {"0": 1}, "guidance": -1}',
        '{"values": {"0": 1}, "guidance": 1e308}',  # beyond what decoding keeps finite
        '{"values": {"0": 1}, "num_samples": "2"}',  # numbers are numbers, as in `values`
        '{"values": {"0": 1}, "seed": "7"}',
        '{"values": {"0": 1}, "steps": 2.5}',
        '{"values": {"0": 1}, "steps": true}',
        '{"values": {"0": 1}, "temperature": "1.5"}',
        '{"values": {"0": 1}, "return_png": "yes"}',
        '{"values": {"0": 1}, "return_png": 0}',
        '{"values": {"0": 1, "00": 2}}',  # positions are written without leading zeros
        '{"values": {"07": 2}}',  # positions are written plainly
    ],
)
def test_schema_refuses_malformed_fields(body):
    with pytest.raises(ValidationError):
        CompleteRequest.model_validate_json(body)


def test_an_empty_request_asks_for_a_joint_sample_and_only_targets_come_back(served):
    joint = task(served)
    assert (joint.roles_L == TARGET).all()
    partial = task(served, values={0: 3}, target=[4, 5])
    (samples,) = complete_tasks(served.model, [partial], served.device)
    (row,) = respond(partial, samples, served).samples
    assert row.values[0] == 3 and all(isinstance(row.values[i], int) for i in (4, 5))
    assert [i for i, value in enumerate(row.values) if value is None] == [i for i in range(L) if i not in (0, 4, 5)]


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_decodes_as_the_most_likely_value_does(served, temperature):
    greedy = task(served, values={0: 3}, num_samples=2, seed=1, temperature=0.0)
    tiny = task(served, values={0: 3}, num_samples=2, seed=1, temperature=temperature)
    (expected,), (got,) = (complete_tasks(served.model, [t], served.device) for t in (greedy, tiny))
    assert torch.equal(got, expected) and not (got[:, 1:] == 0).all()


def test_the_largest_guidance_allowed_keeps_decoding_finite(served):
    for guidance in (1e6, 1e3):
        guided = task(served, values={0: 3, 1: 2}, num_samples=2, seed=1, guidance=guidance)
        (samples,) = complete_tasks(served.model, [guided], served.device)
        assert ((samples >= 0) & (samples < V)).all() and not (samples[:, 2:] == 0).all()


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"values": {"0": true}}', "values[0] = true is neither a token id nor a number"),
        ('{"values": {"age": 3}}', "values names column 'age', but this model is not a table"),
        ('{"values": {"0": 1}, "target": ["age"]}', "target lists column names, but this model is not a table"),
    ],
)
def test_token_models_refuse_column_names(served, body, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_request(CompleteRequest.model_validate_json(body), served, CFG)


def test_decoding_defaults_come_from_config(served):
    t = task(served, values={0: 1})
    assert astuple(t.decoding) == (4, "random", 1.0, None, 0.0)
    t = task(served, values={0: 1}, steps=2, order="random", temperature=0.5, top_k=3, guidance=1.5)
    assert astuple(t.decoding) == (2, "random", 0.5, 3, 1.5)


def test_guidance_counts_twice_against_a_requests_work_limit(served):
    cfg = ServingConfig(limits={"max_num_samples": 8, "max_tokens_per_request": 4 * L})
    assert parse_request(CompleteRequest(values={0: 1}, num_samples=4), served, cfg).num_samples == 4
    assert parse_request(CompleteRequest(values={0: 1}, num_samples=2, guidance=1.0), served, cfg).num_samples == 2
    with pytest.raises(RequestError, match=rf"num_samples \* length \* 2 \(guidance\) = {8 * L} exceeds {4 * L}"):
        parse_request(CompleteRequest(values={0: 1}, num_samples=4, guidance=1.0), served, cfg)
    with pytest.raises(RequestError, match=rf"num_samples \* length = {5 * L} exceeds"):
        parse_request(CompleteRequest(values={0: 1}, num_samples=5), served, cfg)


def test_serving_config_rejects_unknown_keys_and_unbatchable_limits():
    with pytest.raises(ConfigError, match="unknown key 'batching.max_rows'"):
        validate_config(ServingConfig, {"batching": {"max_rows": 4}})
    with pytest.raises(ConfigError, match="max_batch_rows"):
        validate_config(ServingConfig, {"batching": {"max_batch_rows": 4}, "limits": {"max_num_samples": 8}})


# --- PNG ----------------------------------------------------------------------------------------


def test_png_round_trip_and_image_request(served):
    values_L = torch.arange(L) % V
    assert torch.equal(decode_png(encode_png(values_L, (H, W), V), (H, W), V, "x"), values_L)
    mask_HW = np.zeros((H, W))
    mask_HW[: H // 2] = 255  # top half known
    t = task(served, image={"png": encode_png(values_L, (H, W), V), "mask": png(mask_HW)}, return_png=True)
    half = L // 2
    assert (t.roles_L[:half] == SOURCE).all() and (t.roles_L[half:] == TARGET).all()
    assert torch.equal(t.values[:half], values_L[:half])
    with pytest.raises(RequestError, match="this model takes 4x4"):
        task(served, image={"png": png(np.zeros((3, 4)))})
    samples = complete_tasks(served.model, [t], served.device)[0]
    reply = respond(t, samples, served)
    assert torch.equal(decode_png(reply.samples[0].png, (H, W), V, "x"), samples[0])


# --- the batched call ---------------------------------------------------------------------------


def mixed_tasks(served):
    """Different (S, T), sample counts and seeds; one with absent positions, one with none."""
    return [
        task(served, values={0: 1, 3: 2}, target=[4, 5, 6], num_samples=3, seed=5),
        task(served, values={i: i % V for i in range(8)}, target="rest", num_samples=2, seed=6),
        task(served, values={15: 4}, target=list(range(0, L, 2)), seed=7),
        task(served, values={0: 1, 3: 2}, target=[4, 5, 6], num_samples=3, seed=8),
    ]


def test_completions_keep_sources_fill_targets_and_leave_absent_alone(served):
    tasks = mixed_tasks(served)
    for t, samples in zip(tasks, complete_tasks(served.model, tasks, served.device)):
        assert samples.shape == (t.num_samples, L)
        source, target = t.roles_L == SOURCE, t.roles_L == TARGET
        assert torch.equal(samples[:, source], t.values[source].expand(t.num_samples, -1))
        assert ((samples[:, target] >= 0) & (samples[:, target] < V)).all()
        assert (samples[:, ~(source | target)] == 0).all()


def test_a_requests_samples_do_not_depend_on_its_batch(served):
    tasks = mixed_tasks(served)
    together = complete_tasks(served.model, tasks, served.device)
    for t, batched in zip(tasks, together):
        alone = complete_tasks(served.model, [t], served.device)[0]
        assert torch.equal(alone, batched)
    # same request and seed, same answer; a different seed (same task) answers differently
    assert not torch.equal(together[0], together[3])
    assert len({tuple(row.tolist()) for row in together[0]}) > 1, "samples of one request should differ"


def test_tasks_with_different_decoding_are_run_apart_but_answered_in_order(served):
    a = task(served, values={0: 1}, steps=2, seed=1)
    b = task(served, values={0: 1}, steps=4, seed=1)
    c = task(served, values={0: 1}, temperature=0, seed=2)
    out = complete_tasks(served.model, [a, b, c], served.device)
    for t, samples in zip([a, b, c], out):
        assert torch.equal(samples, complete_tasks(served.model, [t], served.device)[0])


# --- the pieces it rests on ------------------------------------------------------------------------


def test_per_row_generators_make_rows_independent_of_each_other(served):
    g = torch.Generator().manual_seed(3)
    values_BL = torch.randint(0, V, (6, L), generator=g)
    roles_BL = torch.randint(0, 3, (6, L), generator=g).to(torch.int8)
    roles_BL[:, 0] = TARGET
    roles_BL[2] = torch.where(torch.arange(L) < 3, SOURCE, TARGET)  # a row with nothing absent
    for order in ("random", "confidence"):
        gens = lambda: [torch.Generator().manual_seed(40 + b) for b in range(6)]  # noqa: E731
        batch = complete(served.model, values_BL, roles_BL, gens(), steps=3, order=order)
        for b in range(6):
            alone = complete(
                served.model, values_BL[b : b + 1], roles_BL[b : b + 1], gens()[b : b + 1], steps=3, order=order
            )
            assert torch.equal(alone[0], batch[b])
        # and the noise matters: other seeds give other samples
        assert not torch.equal(batch, complete(served.model, values_BL, roles_BL, gens()[::-1], steps=3, order=order))
    with pytest.raises(ValueError, match="2 generators for 6 rows"):
        complete(served.model, values_BL, roles_BL, gens()[:2])


def test_packing_absent_positions_keeps_a_rows_logits_whatever_the_other_rows(served):
    """drop_absent packs each row to the batch's longest kept row; padding must not leak."""
    g = torch.Generator().manual_seed(4)
    values_BL = torch.randint(0, V, (5, L), generator=g)
    roles_BL = torch.full((5, L), TARGET, dtype=torch.int8)
    roles_BL[1, :10] = ABSENT  # 6 kept
    roles_BL[2, ::2] = ABSENT  # 8 kept
    roles_BL[3, 3:] = SOURCE
    roles_BL[4, 12:] = ABSENT  # 12 kept
    with torch.no_grad():
        for rows in ([1, 2], [1, 4], [0, 1, 2, 3, 4], [2, 4]):
            batch = served.model(values_BL[rows], roles_BL[rows])
            for i, b in enumerate(rows):
                alone = served.model(values_BL[b : b + 1], roles_BL[b : b + 1])[0]
                kept = roles_BL[b] != ABSENT
                assert torch.allclose(alone[kept], batch[i][kept], atol=1e-5), (rows, b)


def test_inverse_cdf_sampling_follows_the_distribution():
    from biglearn.generation import sample_values

    logits_NV = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, -1)
    uniform_N = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    sampled_N, _ = sample_values(logits_NV, None, 1.0, None, uniform_N)
    freq = torch.bincount(sampled_N, minlength=4).float() / 20000
    assert torch.allclose(freq, logits_NV[0].softmax(-1), atol=0.01)
    sampled_N, _ = sample_values(logits_NV, None, 1.0, 2, torch.full((20000,), 0.999999999))
    assert set(sampled_N.tolist()) <= {1, 2}, "top-k: never a value outside the top k"


# --- generators (BigLearn-GAN exports): patches in, one noisy pass out -------------------------------

GL, GP = 6, 2  # positions, patch dimension


@pytest.fixture(scope="module")
def served_generator(tmp_path_factory) -> ExportedModel:
    spec = ModelSpec(model=ModelConfig(d_model=32, num_layers=2, num_heads=4), length=GL, patch_dim=GP, noise_dim=4)
    folder = tmp_path_factory.mktemp("gan-export")
    manifest = {"name": "toy-gan", "kind": "continuous", "length": GL, "patch_dim": GP}
    write_export(folder, UniversalTransformer(spec).state_dict(), spec, manifest, {"run": {"name": "toy-gan"}})
    return ExportedModel(folder)


def test_generator_samples_keep_patches_fill_targets_and_do_not_depend_on_their_batch(served_generator):
    served = served_generator
    assert (served.card.kind, served.card.patch_dim, served.card.vocab_size, served.card.png) == (
        "continuous",
        GP,
        None,
        False,
    )
    assert served.problem is None
    given = {0: [0.25, -1.0], 3: [2, 0.5]}  # an int inside a patch is a number like any other
    tasks = [
        task(served, values=given, target="rest", num_samples=3, seed=5),
        task(served, values=[None, [1.0, 1.0], None, None, None, None], target=[0, 4], seed=6),
        task(served, values=given, target="rest", num_samples=3, seed=7),
    ]
    assert tasks[0].decoding is None and tasks[0].values.dtype == torch.float32
    together = complete_tasks(served.model, tasks, served.device)
    first = together[0]
    assert first.shape == (3, GL, GP)
    assert torch.equal(first[:, [0, 3]], torch.tensor([[0.25, -1.0], [2.0, 0.5]]).expand(3, -1, -1)), (
        "sources unchanged"
    )
    assert torch.isfinite(first).all() and len({tuple(row.flatten().tolist()) for row in first}) == 3
    assert (together[1][0, [2, 3, 5]] == 0).all(), "absent positions stay 0"
    for t, batched in zip(tasks, together):
        # The same noise; only float rounding differs between batch shapes (no discrete draw absorbs it).
        assert torch.allclose(complete_tasks(served.model, [t], served.device)[0], batched, atol=1e-5)
    assert torch.equal(complete_tasks(served.model, tasks, served.device)[0], first), "same batch, same bits"
    assert not torch.allclose(together[0], together[2], atol=1e-3), "another seed, other samples"

    answer = respond(tasks[0], first, served)
    assert answer.steps is None and answer.order is None
    assert answer.samples[0].values[0] == [0.25, -1.0] and len(answer.samples[0].values) == GL


def test_generator_with_one_number_per_position_answers_numbers(tmp_path):
    spec = ModelSpec(model=ModelConfig(d_model=16, num_layers=1, num_heads=2), length=2, patch_dim=1, noise_dim=2)
    write_export(tmp_path, UniversalTransformer(spec).state_dict(), spec, {"name": "gmm", "kind": "continuous"}, {})
    served = ExportedModel(tmp_path)
    t = task(served, values=[0.5, None], seed=1, num_samples=2)
    answer = respond(t, complete_tasks(served.model, [t], served.device)[0], served)
    assert [s.values[0] for s in answer.samples] == [0.5, 0.5]
    assert all(isinstance(v, float) for s in answer.samples for v in s.values)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"values": {0: [1.0]}}, "values[0] has 1 numbers; each known value of this model is a list of 2 numbers"),
        ({"values": {0: 3}}, "values[0] has 1 numbers"),
        ({"values": {0: [1.0, 2.0]}, "steps": 4}, "steps: this model is a BigLearn-GAN generator"),
        ({"values": {0: [1.0, 2.0]}, "temperature": 0.5, "top_k": 2}, "temperature, top_k: this model"),
        ({"values": {0: [1.0, 2.0]}, "guidance": 1.0}, "guidance: this model is a BigLearn-GAN generator"),
        ({"values": {0: [1.0, 2.0]}, "return_png": True}, "not the pixels of an image"),
    ],
)
def test_bad_generator_requests_say_what_to_fix(served_generator, fields, message):
    with pytest.raises(RequestError) as err:
        task(served_generator, **fields)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "body", ['{"values": {"0": [1, NaN]}}', '{"values": {"0": Infinity}}', '{"values": {"0": [1, "2"]}}']
)
def test_schema_refuses_non_finite_or_non_numeric_patches(body):
    with pytest.raises(ValidationError):
        CompleteRequest.model_validate_json(body)


# --- a table model: columns by name ---------------------------------------------------------------


@pytest.fixture(scope="module")
def table_model(table_export_folder) -> ExportedModel:
    return ExportedModel(table_export_folder)


def table_answer(served: ExportedModel, body: dict) -> dict:
    task = parse_request(CompleteRequest.model_validate_json(json.dumps(body)), served, CFG)
    (samples,) = complete_tasks(served.model, [task], served.device)
    return json.loads(respond(task, samples, served).model_dump_json(exclude_none=True))


def test_a_table_model_lists_its_columns_and_answers_by_column_name(table_model):
    columns = {column.name: column for column in table_model.card.columns}
    assert [c.type for c in table_model.card.columns] == ["numeric", "numeric", "categorical", "boolean"]
    assert columns["city"].categories == ["Lima", "Oslo", "Pune"] and columns["age"].integer
    assert 18 <= columns["age"].minimum < columns["age"].maximum <= 89 and columns["smoker"].categories is None

    answer = table_answer(
        table_model,
        {"values": {"age": 42, "city": "Oslo"}, "target": ["income", "smoker"], "num_samples": 6, "seed": 3},
    )
    assert len(answer["samples"]) == 6 and set(answer["estimate"]) == {"income", "smoker"}
    incomes = [sample["values"]["income"] for sample in answer["samples"]]
    for sample in answer["samples"]:
        values = sample["values"]
        assert set(values) == {"age", "city", "income", "smoker"}  # given and targets; nothing else
        assert values["age"] == 42 and values["city"] == "Oslo" and isinstance(values["smoker"], bool)
        assert columns["income"].minimum <= values["income"] <= columns["income"].maximum
    assert len(set(incomes)) == 6  # drawn within bins: continuous values, not bin centres
    assert answer["estimate"]["income"] == pytest.approx(np.mean(incomes))
    assert answer["estimate"]["smoker"] in (True, False)

    joint = table_answer(table_model, {"target": "rest", "num_samples": 2})  # no values: a synthetic row
    assert all(
        isinstance(s["values"]["age"], int) and s["values"]["city"] in columns["city"].categories
        for s in joint["samples"]
    )
    assert (
        table_answer(table_model, {"values": {"age": 42.5, "smoker": None}, "num_samples": 2, "seed": 1})["samples"][0][
            "values"
        ]["age"]
        == 42.5
    )  # a given value comes back as given; null = unknown, so smoker is a target


@pytest.mark.parametrize(
    "body, message",
    [
        (
            {"values": {"height": 1.8}},
            "values names column(s) ['height'] that this model does not have; its columns are",
        ),
        ({"values": {"age": 42}, "target": ["weight"]}, "target names column(s) ['weight']"),
        ({"values": {"age": "old"}}, "values['age'] = \"old\": column 'age' is numeric; send a number"),
        ({"values": {"age": True}}, "column 'age' is numeric"),
        ({"values": {"smoker": 1}}, "column 'smoker' is boolean; send true or false"),
        (
            {"values": {"city": "Rome"}},
            "values['city'] = \"Rome\": not a category of column 'city'; it has Lima, Oslo, Pune",
        ),
        ({"values": {"city": 2.5}}, "column 'city' is categorical"),
        ({"values": {"age": 42}, "target": ["city", "city"]}, "target lists a column more than once"),
        ({"values": {"age": 42}, "target": [1]}, "this model is a table; list column names"),
        ({"values": {"age": 42}, "target": []}, "target is empty"),
        ({"values": [1, 2, 3, 4]}, "values: this model is a table; send values as {column: value}"),
    ],
)
def test_table_requests_that_cannot_be_answered_say_what_to_fix(table_model, body, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_request(CompleteRequest.model_validate_json(json.dumps(body)), table_model, CFG)


def test_a_non_finite_table_value_is_refused_by_the_schema():
    with pytest.raises(ValidationError):
        CompleteRequest.model_validate_json('{"values": {"income": NaN}}')


# --- the published request schema ---------------------------------------------------------------


def accepted(served: ExportedModel, body: str, cfg: ServingConfig = CFG) -> bool:
    try:
        parse_request(CompleteRequest.model_validate_json(body), served, cfg)
    except (ValidationError, RequestError):
        return False
    return True


def valid(served: ExportedModel, body: str, cfg: ServingConfig = CFG) -> bool:
    import jsonschema

    return jsonschema.Draft202012Validator(request_schema(served, cfg)).is_valid(json.loads(body))


TOKEN_BODIES = [
    "{}",
    '{"values": {"0": 3, "5": null}, "target": [1, 2], "num_samples": 8, "steps": 8}',
    '{"values": {"0": 3}, "target": [0, 1], "seed": 9007199254740991, "top_k": 1000}',
    f'{{"values": {json.dumps([1] * L)}}}',
    f'{{"values": {json.dumps([1] * (L - 1))}}}',
    '{"values": {"0": 17}}',
    f'{{"values": {{"{L}": 1}}}}',
    '{"values": {"01": 1}}',
    '{"values": {"0": 1.5}}',
    '{"num_samples": 9}',
    '{"steps": 9}',
    '{"seed": 9007199254740992}',
    '{"target": []}',
    '{"target": [1, 1]}',
    '{"values": {"0": 1}, "image": {"png": "AAAA"}}',
    '{"return_png": true, "temperature": 0, "guidance": 1000000, "order": "confidence"}',
    '{"guidance": 1000001}',
    '{"colour": "red"}',
    '{"values": {"63": null}}',
    '{"values": {"999": null}}',
    '{"values": {"+1": 1}}',
    '{"values": {" 1": 1}}',
]


@pytest.mark.parametrize("body", TOKEN_BODIES)
def test_the_published_schema_accepts_exactly_what_the_server_accepts(served, body):
    assert valid(served, body) == accepted(served, body), request_schema(served, CFG)["properties"]


@pytest.mark.parametrize(
    "body",
    [
        '{"values": {"age": 42, "city": 3, "smoker": null}, "target": ["income", "age"]}',
        '{"values": {"city": "Lima", "smoker": false}, "target": "rest", "temperature": 1e300}',
        '{"values": {"city": "Rome"}}',
        '{"values": {"smoker": 1}}',
        '{"values": {"weight": 1}}',
        '{"values": {"weight": null}}',
        '{"values": {"age": 1e300, "income": 100000000000000000000000000000000000000000000}}',
        '{"target": ["age", "age"]}',
        '{"values": [1, 2, 3, 4]}',
        '{"return_png": true}',
    ],
)
def test_a_table_models_schema_names_its_columns_and_categories(table_model, body):
    assert valid(table_model, body) == accepted(table_model, body)


@pytest.mark.parametrize(
    "body",
    [
        '{"values": {"0": [1, 2], "1": null}, "num_samples": 8}',
        '{"values": {"0": [1, 2]}, "steps": 4}',
        '{"values": {"0": [1, 2]}, "steps": null}',
        '{"values": {"0": 1}}',
        '{"image": null, "return_png": false}',
    ],
)
def test_a_generators_schema_takes_patches_and_no_decoding(served_generator, body):
    assert valid(served_generator, body) == accepted(served_generator, body)


@pytest.mark.parametrize("default_guidance", [0.0, 2.0])
@pytest.mark.parametrize("num_samples", [2, 3, 4, 5])
@pytest.mark.parametrize("guidance", [None, 0, 1])
def test_the_token_budget_bounds_num_samples_by_guidance(served, default_guidance, num_samples, guidance):
    """With guidance every row is decoded twice: the schema says so with if/then/else."""
    cfg = ServingConfig(
        limits={"max_num_samples": 8, "max_tokens_per_request": 4 * L}, decoding={"guidance": default_guidance}
    )
    body = json.dumps({"num_samples": num_samples} | ({} if guidance is None else {"guidance": guidance}))
    assert valid(served, body, cfg) == accepted(served, body, cfg)


def test_position_patterns_match_exactly_the_positions():
    for length in (1, 9, 10, 64, 101, 784, 16384):
        pattern = re.compile(position_pattern(length))
        matched = [n for n in range(20000) if pattern.fullmatch(str(n))]
        assert matched == list(range(length)), length
        assert not any(pattern.fullmatch(text) for text in ("00", "01", "-1", "", "1.0"))


def test_a_table_model_never_samples_another_columns_tokens(table_model):
    """At a huge temperature every token is nearly equally likely: the other columns' tokens
    must still be ruled out, or decoding a cell fails."""
    hot = parse_request(CompleteRequest(temperature=1e300, num_samples=8), table_model, CFG)
    (samples,) = complete_tasks(table_model.model, [hot], table_model.device)
    ranges = torch.tensor(table_model.table.position_vocab)
    assert ((samples >= ranges[:, 0]) & (samples < ranges[:, 1])).all()
    assert len(respond(hot, samples, table_model).samples) == 8
