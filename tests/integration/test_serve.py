"""The Serve endpoint on a local Ray cluster, over real HTTP, serving a freshly trained export:
completions, batching across callers, the model card and health, bad input, overload, the
Prometheus metrics, and a replica killed under load."""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from biglearn.export import write_export
from biglearn.serve.app import app_from_config
from biglearn.serving import decode_png
from biglearn.train.run import pretrain
from tests.exports import write_table_export
from tests.integration.conftest import free_port, start_local_ray, tiny_config, wait_for

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)

L, V = 64, 17
MAX_ONGOING = 8  # per replica: also the batch size in rows
SETTINGS = [
    "limits.max_num_samples=4",
    "limits.max_body_bytes=20000",
    "limits.max_steps=32",
    f"batching.max_batch_rows={MAX_ONGOING}",
    "batching.batch_wait_timeout_s=0.05",
    "decoding.steps=4",
    "torch_threads=1",
]
DEPLOYMENT = {
    "num_replicas": 2,
    "max_ongoing_requests": MAX_ONGOING,
    "max_queued_requests": 32,  # requests waiting for assignment count too: slack for a busy machine
    "health_check_period_s": 1,
    "health_check_timeout_s": 5,
    "ray_actor_options": {"num_cpus": 0.5},
}


@pytest.fixture(scope="module")
def export(digits, tmp_path_factory) -> Path:
    import ray

    cfg = tiny_config(
        digits,
        tmp_path_factory.mktemp("runs"),
        "serve-tiny",
        "cluster.num_workers=1",
        "train.steps=10",
        "train.log_every=5",
        "train.checkpoint_every=10",
    )
    start_local_ray(metrics_port=True)
    yield Path(pretrain(cfg).export)
    ray.shutdown()


@pytest.fixture(scope="module")
def server(export):
    import ray
    from ray import serve

    app, run_kwargs, http_options = app_from_config(export=str(export), overrides=SETTINGS, deployment=DEPLOYMENT)
    assert http_options["host"] == "127.0.0.1", "the shipped config must listen on loopback only"
    port = free_port()
    serve.start(http_options={**http_options, "port": port})
    serve.run(app, **run_kwargs)
    metrics_port = ray._private.worker.global_worker.node.metrics_export_port
    yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()


# What the main app answered on /v1/complete, by status, as the clients saw it; 503s are left
# out (how many a burst gets varies). Side apps are deployed by some tests.
SIDE_APPS = ("/broken", "/gan", "/table", "/contract")
ANSWERED: Counter = Counter()
_answered_lock = threading.Lock()


@contextmanager
def side_app(export, name: str):
    """`export` served as its own application at /<name> (one small replica) while the block runs."""
    from ray import serve

    app, _, _ = app_from_config(
        export=str(export),
        overrides=SETTINGS,
        deployment={**DEPLOYMENT, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
    )
    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        yield
    finally:
        serve.delete(name)


def post(base: str, body, timeout: float = 60) -> requests.Response:
    if isinstance(body, (str, bytes)):
        response = requests.post(
            f"{base}/v1/complete", data=body, headers={"content-type": "application/json"}, timeout=timeout
        )
    else:
        response = requests.post(f"{base}/v1/complete", json=body, timeout=timeout)
    if not base.endswith(SIDE_APPS) and response.status_code != 503:
        with _answered_lock:
            ANSWERED[str(response.status_code)] += 1
    return response


def scrape(url: str) -> list:
    return list(text_string_to_metric_families(requests.get(url, timeout=10).text))


def metric(families, sample_name: str, **labels) -> float:
    """Sum over the main app's replicas (and any labels not given) of one sample name."""
    labels.setdefault("application", "biglearn")
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def settled(url: str, also=lambda families: True) -> list:
    """A scrape that holds every request answered so far (and for which `also` holds). Ray's agent
    exports each process's metrics as periodic snapshots: the gateway's and the model replicas'
    arrive separately."""

    def caught_up():
        families = scrape(url)
        counted = {s: metric(families, "ray_biglearn_requests_total", route="/v1/complete", status=s) for s in ANSWERED}
        return counted == dict(ANSWERED) and also(families) and families

    return wait_for(caught_up, 30, f"the metrics to count {dict(ANSWERED)}")


# --- completions --------------------------------------------------------------------------------


def test_completions_keep_given_values_fill_targets_and_repeat_by_seed(server):
    base, _ = server
    known = {i: (3 * i) % V for i in range(32)}  # the top half of the digit
    body = {"values": {str(k): v for k, v in known.items()}, "target": "rest", "num_samples": 3, "seed": 11}
    first = post(base, body)
    assert first.status_code == 200, first.text
    samples = [s["values"] for s in first.json()["samples"]]
    assert len(samples) == 3 and all(len(s) == L for s in samples)
    for sample in samples:
        assert all(sample[k] == v for k, v in known.items())
        assert all(0 <= v < V for v in sample)
    assert len({tuple(s[32:]) for s in samples}) > 1, "three samples of the same request should differ"

    assert post(base, body).json() == first.json(), "same seed, same answer"
    assert post(base, {**body, "seed": 12}).json()["samples"] != first.json()["samples"]
    # the list form with nulls is the same request
    listed = [known.get(i) for i in range(L)]
    assert post(base, {**body, "values": listed}).json() == first.json()
    # guided: the same seed, other draws (a second, unconditional model call reweights them); sources
    # kept. In confidence order, as the reweighting also moves which targets commit first: this
    # barely trained model's two calls differ too little to change inverse-CDF draws on their own.
    guided = post(base, {**body, "order": "confidence", "guidance": 2.0}).json()
    unguided = post(base, {**body, "order": "confidence"}).json()
    assert guided["guidance"] == 2.0 and unguided["guidance"] == 0.0
    assert all(s["values"][k] == v for s in guided["samples"] for k, v in known.items())
    assert guided["samples"] != unguided["samples"]

    # explicit targets: only they are filled; positions in neither S nor T come back as null (0 in the PNG)
    partial = post(base, {"values": {"0": 5}, "target": [10, 20, 30], "seed": 3, "return_png": True}).json()
    values = partial["samples"][0]["values"]
    assert values[0] == 5 and all(values[i] is None for i in range(L) if i not in (0, 10, 20, 30))
    assert all(isinstance(values[i], int) for i in (10, 20, 30))
    png_values = decode_png(partial["samples"][0]["png"], (8, 8), V, "png")
    assert png_values.tolist() == [0 if value is None else value for value in values]


def test_concurrent_requests_with_different_tasks_are_batched_without_changing_answers(server):
    base, metrics_url = server
    bodies = [
        {
            "values": {str(i): (i + n) % V for i in range(n, n + 8)},
            "target": "rest" if n % 2 else list(range(40, 40 + n + 1)),
            "seed": n,
            "num_samples": 1 + n % 2,
        }
        for n in range(12)
    ]
    alone = [post(base, b).json() for b in bodies]
    before = settled(metrics_url)
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(base, b), bodies))
    assert [r.status_code for r in together] == [200] * len(bodies)
    assert [r.json() for r in together] == alone, "a request's answer must not depend on its batch"

    rows = sum(b["num_samples"] for b in bodies)
    tokens = sum(b["num_samples"] * (L - 8 if b["target"] == "rest" else len(b["target"])) for b in bodies)

    def delta(families, name, **labels):
        return metric(families, name, **labels) - metric(before, name, **labels)

    after = settled(metrics_url, also=lambda now: delta(now, "ray_biglearn_batched_rows_total") == rows)
    assert delta(after, "ray_biglearn_requests_total", route="/v1/complete", status="200") == len(bodies)
    assert delta(after, "ray_biglearn_samples_generated_total") == rows
    assert delta(after, "ray_biglearn_tokens_generated_total") == tokens
    assert delta(after, "ray_biglearn_request_latency_ms_count", route="/v1/complete") == len(bodies)
    calls = delta(after, "ray_biglearn_model_calls_total")
    single = delta(after, "ray_biglearn_batch_requests_bucket", le="1.0")
    print(f"\n[serve] {len(bodies)} concurrent requests ({rows} rows) ran in {calls:.0f} model calls")
    assert calls < len(bodies) and single < calls, "concurrent requests should share model calls"
    # The exact series the dashboard's means come from, beside the histograms they summarise.
    assert delta(after, "ray_biglearn_batch_rows_count") == delta(after, "ray_biglearn_batch_requests_count") == calls
    assert delta(after, "ray_biglearn_batched_requests_total") == len(bodies)
    seconds = delta(after, "ray_biglearn_request_seconds_total", route="/v1/complete")
    assert 0 < seconds < 60 * len(bodies)
    assert metric(after, "ray_biglearn_model_load_seconds") > 0


# --- what it is, and whether it is well --------------------------------------------------------------


def test_model_card_health_and_docs(server, export):
    base, _ = server
    card = requests.get(f"{base}/v1/model", timeout=10).json()
    assert (card["dataset"], card["kind"], card["length"], card["vocab_size"]) == ("digits", "discrete", L, V)
    assert card["geometry"]["height"] == 8 and card["png"] is True
    assert card["panel"] == json.loads((export / "panel.json").read_text())
    config = json.loads((export / "config.json").read_text())
    assert card["config_sha256"] == hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    assert requests.get(f"{base}/v1/health", timeout=10).json()["status"] == "ok"
    assert requests.head(f"{base}/v1/health", timeout=10).status_code == 200  # load balancers ask with HEAD
    form_type = {"content-type": "application/x-www-form-urlencoded"}  # what `curl -d` sends unless told
    form = requests.post(f"{base}/v1/complete", data='{"values": {"0": 1}}', headers=form_type, timeout=10)
    assert form.status_code == 415 and "content-type: application/json" in form.json()["detail"]
    assert requests.get(f"{base}/-/healthz", timeout=10).status_code == 200
    assert "/v1/complete" in requests.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    docs = requests.get(f"{base}/docs", timeout=10)
    assert docs.status_code == 200 and "/docs/assets/swagger-ui-bundle.js" in docs.text
    assert all(url.startswith("/") for url in re.findall(r'(?:src|href)="([^"]+)"', docs.text)), "no CDN"
    script = requests.get(f"{base}/docs/assets/swagger-ui-bundle.js", timeout=10)
    assert script.status_code == 200 and len(script.content) > 100_000
    assert requests.get(f"{base}/docs/assets/secrets.txt", timeout=10).status_code == 404


def schemathesis_run(base: str, max_examples: int, tmp_path: Path, png_shape: tuple[int, int] | None = None) -> Counter:
    """Schemathesis (`--checks all`) against the OpenAPI document served at `base`; asserts it found
    nothing and returns the test cases it generated per operation."""
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    if png_shape:
        env["BIGLEARN_PNG_SHAPE"] = "x".join(map(str, png_shape))
    command = [str(Path(sys.executable).with_name("st")), "run", f"{base}/openapi.json", "--url", base]
    command += ["--checks", "all", "--max-examples", str(max_examples), "--seed", "1", "--workers", "2"]
    command += ["--request-timeout", "30", "--report", "ndjson", "--report-dir", str(tmp_path)]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    cases: Counter = Counter()
    for line in next(tmp_path.glob("ndjson-*")).read_text().splitlines():
        event = json.loads(line)
        if "ScenarioFinished" in event:
            recorder = event["ScenarioFinished"]["recorder"]
            cases[recorder["label"]] += len(recorder.get("cases", {}))
    print(f"\n[serve] schemathesis --checks all at {base}: no failure; cases per operation {dict(cases)}")
    return cases


def test_schemathesis_finds_nothing_against_the_published_contract(server, export, tmp_path):
    """Every check Schemathesis has, on requests it derives from /openapi.json: valid ones must be
    answered (so the schema must hold every limit of this model), invalid ones refused with a
    documented 4xx in the documented error body. Served as a side app: its requests stay out of
    the main app's metrics."""
    base, _ = server
    with side_app(export, "contract"):
        cases = schemathesis_run(f"{base}/contract", 200, tmp_path, png_shape=(8, 8))
    assert set(cases) == {"POST /v1/complete", "GET /v1/model", "GET /v1/health", "HEAD /v1/health"}
    assert cases["POST /v1/complete"] >= 200


def test_health_fails_for_an_export_that_cannot_serve(server, export, tmp_path):
    """An export whose weights compute NaN loads, but must not be reported healthy or used."""
    from safetensors.torch import load_file

    from biglearn.model import ModelSpec

    base, _ = server
    state = {k: torch.full_like(v, float("nan")) for k, v in load_file(export / "model.safetensors").items()}
    spec = ModelSpec.model_validate_json((export / "model.json").read_text())
    write_export(tmp_path, state, spec, json.loads((export / "manifest.json").read_text()), {})
    with side_app(tmp_path, "broken"):
        health = requests.get(f"{base}/broken/v1/health", timeout=10)
        assert health.status_code == 503 and "not finite" in health.json()["detail"]
        assert post(f"{base}/broken", {"values": {"0": 1}}).status_code == 503
    assert requests.get(f"{base}/v1/health", timeout=10).status_code == 200


def test_a_gan_export_serves_one_pass_samples_of_numbers(server, tmp_path):
    """A BigLearn-GAN export (a 2-D generator like the 25-GMM one, one number per position)."""
    from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer

    base, _ = server
    spec = ModelSpec(model=ModelConfig(d_model=32, num_layers=1, num_heads=2), length=2, patch_dim=1, noise_dim=4)
    manifest = {"name": "gmm25", "kind": "continuous", "length": 2, "patch_dim": 1}
    write_export(tmp_path, UniversalTransformer(spec).state_dict(), spec, manifest, {})
    with side_app(tmp_path, "gan"):
        card = requests.get(f"{base}/gan/v1/model", timeout=10).json()
        assert (card["kind"], card["length"], card["patch_dim"], card["vocab_size"], card["png"]) == (
            "continuous",
            2,
            1,
            None,
            False,
        )
        body = {"values": [0.75, None], "num_samples": 4, "seed": 3}
        answer = post(f"{base}/gan", body)
        assert answer.status_code == 200, answer.text
        samples = [s["values"] for s in answer.json()["samples"]]
        assert all(s[0] == 0.75 and isinstance(s[1], float) for s in samples)
        assert len({s[1] for s in samples}) == 4, "each sample draws its own noise"
        assert post(f"{base}/gan", body).json() == answer.json() and "steps" not in answer.json()
        refused = post(f"{base}/gan", {**body, "steps": 4})
        assert refused.status_code == 422 and "BigLearn-GAN" in refused.json()["detail"]
        assert post(f"{base}/gan", '{"values": {"1": NaN}}').status_code == 422
        (tmp_path / "schemathesis").mkdir()
        schemathesis_run(f"{base}/gan", 100, tmp_path / "schemathesis")


def test_a_table_export_is_asked_and_answers_by_column_name(server, tmp_path):
    """A model of a table (untrained): typed values by column name in, typed values by column out."""
    import numpy as np

    base, _ = server
    rng = np.random.default_rng(0)
    table = {
        "age": rng.integers(18, 90, 100).astype(float),
        "sex": rng.choice(np.array(["F", "M"], dtype=object), 100),
        "income": rng.lognormal(10, 1, 100),
    }
    write_table_export(tmp_path, table, {"age": "numeric", "sex": "categorical", "income": "numeric"}, bins=4)
    with side_app(tmp_path, "table"):
        card = requests.get(f"{base}/table/v1/model", timeout=10).json()
        assert [(c["name"], c["type"]) for c in card["columns"]] == [
            ("age", "numeric"),
            ("sex", "categorical"),
            ("income", "numeric"),
        ]
        assert card["columns"][1]["categories"] == ["F", "M"]
        answer = post(f"{base}/table", {"values": {"age": 42, "sex": "F"}, "target": ["income"], "num_samples": 3})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert all(
            s["values"]["age"] == 42 and s["values"]["sex"] == "F" and isinstance(s["values"]["income"], float)
            for s in body["samples"]
        )
        assert isinstance(body["estimate"]["income"], float)
        for bad, detail in [
            ({"values": {"height": 1}}, "does not have"),
            ({"values": {"sex": "X"}}, "not a category"),
            ({"values": {"age": "old"}}, "is numeric"),
            ('{"values": {"age": NaN}}', None),
        ]:
            refused = post(f"{base}/table", bad)
            assert refused.status_code == 422 and (detail is None or detail in refused.json()["detail"]), refused.text
        kept = post(f"{base}/table", {"values": {"age": 1}, "target": ["age", "sex"]}).json()
        assert kept["samples"][0]["values"]["age"] == 1 and set(kept["estimate"]) == {"sex"}, (
            "a given target stays given"
        )
        (tmp_path / "schemathesis").mkdir()
        schemathesis_run(f"{base}/table", 100, tmp_path / "schemathesis")


# --- bad input and overload ------------------------------------------------------------------------

BAD = [
    ("malformed JSON", '{"values": {"0": 1}', 400, "not valid JSON", "malformed_json"),
    ("wrong length", {"values": [1, 2, 3]}, 422, f"this model takes exactly {L}", "invalid_request"),
    ("outside the vocabulary", {"values": {"0": V}}, 422, "outside the vocabulary", "invalid_request"),
    (
        "non-finite number",
        '{"values": {"0": 1}, "temperature": NaN}',
        422,
        "temperature: Input should be a finite number",
        "invalid_schema",
    ),
    ("empty target", {"values": {"0": 1}, "target": []}, 422, "target is empty", "invalid_request"),
    ("a padded position", {"values": {"07": 1}}, 422, "without leading zeros", "invalid_schema"),
    ("unknown field", {"values": {"0": 1}, "colour": "red"}, 422, "unknown field 'colour'", "invalid_schema"),
    ("too many samples", {"values": {"0": 1}, "num_samples": 5}, 422, "at most 4", "invalid_request"),
    ("too many steps", {"values": {"0": 1}, "steps": 33}, 422, "at most 32", "invalid_request"),
    ("body too large", {"values": {"0": 1}, "pad": "x" * 30000}, 413, "the limit is 20000", "body_too_large"),
]


def test_each_bad_input_gets_its_4xx_and_the_next_good_request_succeeds(server):
    base, metrics_url = server
    before = settled(metrics_url)
    good = {"values": {"0": 1}, "seed": 1}
    expected = post(base, good).json()
    for name, body, status, message, _ in BAD:
        response = post(base, body)
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"] == "application/problem+json", name
        problem = response.json()
        assert problem["status"] == status and problem["title"] and message in problem["detail"], (name, problem)
        assert post(base, good).json() == expected, f"after {name}"

    reasons = {}
    for *_, reason in BAD:
        reasons[reason] = reasons.get(reason, 0) + 1

    after = settled(metrics_url)
    rejected = {
        r: metric(after, "ray_biglearn_rejected_requests_total", reason=r)
        - metric(before, "ray_biglearn_rejected_requests_total", reason=r)
        for r in reasons
    }
    assert rejected == reasons
    for status in ("400", "413", "422"):
        expected_count = sum(1 for b in BAD if str(b[2]) == status)
        got = metric(after, "ray_biglearn_requests_total", route="/v1/complete", status=status) - metric(
            before, "ray_biglearn_requests_total", route="/v1/complete", status=status
        )
        assert got == expected_count, (status, got)


def test_overload_is_refused_at_once_and_the_server_recovers(server):
    base, _ = server
    slow = {"values": {"0": 1}, "target": "rest", "steps": 32, "num_samples": 4}
    capacity = DEPLOYMENT["num_replicas"] * MAX_ONGOING + DEPLOYMENT["max_queued_requests"]
    burst = 128
    with ThreadPoolExecutor(burst) as pool:
        responses = list(pool.map(lambda seed: post(base, {**slow, "seed": seed}), range(burst)))
    statuses = [r.status_code for r in responses]
    refusals = {
        (r.headers["content-type"], r.headers.get("retry-after"), r.json()["status"])
        for r in responses
        if r.status_code == 503
    }
    assert refusals == {("application/problem+json", "1", 503)}, "a full server says when to come back"
    print(
        f"\n[serve] {burst} concurrent slow requests: {statuses.count(200)} answered, {statuses.count(503)} refused with 503"
    )
    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0 and statuses.count(200) <= burst - 1, f"a burst of {burst} over capacity {capacity}"
    assert statuses.count(200) >= MAX_ONGOING
    assert post(base, {"values": {"0": 1}}).status_code == 200


# --- a replica killed under load (last: it changes the replica set) -------------------------------------


def completer_replicas() -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::biglearn#Completer")
    }


def test_a_replica_killed_under_load_is_replaced_and_no_request_hangs(server):
    import ray
    from ray import serve

    base, _ = server
    timeout_s = 30
    outcomes: list[str] = []
    stop = threading.Event()

    def client(worker: int):
        seed = worker * 100_000
        while not stop.is_set():
            seed += 1
            started = time.monotonic()
            try:
                response = post(base, {"values": {"0": 1}, "seed": seed}, timeout=timeout_s)
                if response.status_code == 200:
                    outcomes.append("ok")
                else:
                    kind, wait = response.headers.get("content-type"), response.headers.get("retry-after")
                    outcomes.append(f"http {response.status_code} {kind} retry-after={wait}")
            except requests.Timeout:
                outcomes.append("hung")
            except requests.RequestException as exc:
                outcomes.append(f"error {type(exc).__name__}")
            assert time.monotonic() - started < timeout_s + 5

    replicas = completer_replicas()
    assert len(replicas) == 2
    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, w) for w in range(4)]
        wait_for(lambda: len(outcomes) >= 20, 60, "steady load")
        victim = sorted(replicas)[0]
        killed_at = len(outcomes)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

        def replaced():
            now = completer_replicas()
            status = serve.status().applications["biglearn"].deployments["Completer"]
            return victim not in now and len(now) == 2 and status.replica_states.get("RUNNING") == 2

        started = time.monotonic()
        wait_for(replaced, 90, "a new healthy replica")
        recovery_s = time.monotonic() - started
        time.sleep(1)  # some load on the new replica set
        stop.set()
        for c in clients:
            c.result(timeout=timeout_s + 10)  # every client thread finished: nothing hung

    during = outcomes[killed_at:]
    failed = [o for o in during if o != "ok"]
    print(
        f"\n[serve] replica killed under load: {len(during)} requests during replacement "
        f"({recovery_s:.1f} s), {len(failed)} failed {sorted(set(failed))}, {outcomes.count('hung')} hung"
    )
    assert "hung" not in outcomes
    # The gateway sends a lost replica's requests once more; what still fails says when to retry.
    assert set(failed) <= {"http 503 application/problem+json retry-after=1"}, failed
    assert len(failed) <= MAX_ONGOING, "only requests in flight on the killed replica may fail"
    assert post(base, {"values": {"0": 1}}).status_code == 200


@pytest.mark.parametrize("page", ["README.md", "docs/serving.md"])
def test_the_python_examples_of_the_docs_run_on_a_trained_export(export, page):
    """The Python API's examples, as printed, on this module's digits export (8x8, 17 levels)."""
    text = (Path(__file__).resolve().parents[2] / page).read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert '"runs/digits-quick/export"' in code
    namespace: dict = {}
    exec(code.replace('"runs/digits-quick/export"', repr(str(export))), namespace)  # noqa: S102
    out = namespace["out"]
    assert out.samples.shape == (4, L) and (out.samples[:, :2] == [3, 0]).all() and len(out.images) == 4
