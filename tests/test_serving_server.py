"""The HTTP server (FastAPI TestClient): answers equal offline merged-model predictions under
concurrent mixed-task load, bad input is refused with the right status without disturbing other
requests, tasks are added and removed while requests are in flight, paths stay under the root."""

import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from diffprune import MultiTaskModel  # noqa: E402
from diffprune.serving.server import create_app  # noqa: E402

from .serving_fixtures import (  # noqa: E402, F401  (serving_env is a fixture)
    PAIR_TEXTS,
    SINGLE_TEXTS,
    TASKS,
    inputs_for,
    merged_model,
    reference_logits,
    serving_env,
)


@pytest.fixture(scope="module")
def offline(serving_env):
    """Per task, per input: the merged model's probabilities (or value), computed one input at a time."""
    tok = MultiTaskModel(serving_env["base"]).tokenizer
    out = {}
    for task, run in serving_env["runs"].items():
        merged = merged_model(serving_env["base"], run)
        out[task] = {}
        for x in inputs_for(task):
            logits = reference_logits(merged, tok, [x])[0]
            key = tuple(x) if isinstance(x, list) else x
            out[task][key] = logits if TASKS[task]["task_type"] == "regression" else torch.softmax(logits.double(), -1)
    return out


def make_client(env, **settings):
    model = MultiTaskModel.from_run_dirs(env["runs"])
    settings.setdefault("diff_root", str(env["root"] / "runs"))
    return TestClient(create_app(model, **settings))


@pytest.fixture(scope="module")
def client(serving_env):
    with make_client(serving_env, batch_wait_ms=20) as c:
        yield c


def check(task, inputs, results, offline):
    """None when every result matches the offline prediction (atol 1e-5), else a description."""
    if len(results) != len(inputs):
        return f"{len(results)} results for {len(inputs)} inputs"
    for x, r in zip(inputs, results):
        ref = offline[task][tuple(x) if isinstance(x, list) else x]
        if TASKS[task]["task_type"] == "regression":
            if abs(r["value"] - float(ref[0])) > 1e-5:
                return f"{task} {x!r}: value {r['value']} != {float(ref[0])}"
        else:
            labels = TASKS[task]["labels"]
            if r["label"] != labels[int(ref.argmax())] or r["label_id"] != int(ref.argmax()):
                return f"{task} {x!r}: label {r['label']}"
            got = torch.tensor([r["scores"][lab] for lab in labels], dtype=torch.float64)
            if not torch.allclose(got, ref, atol=1e-5, rtol=0) or abs(r["score"] - float(ref.max())) > 1e-5:
                return f"{task} {x!r}: scores {got.tolist()} != {ref.tolist()}"
    return None


def random_request(rng):
    task = rng.choice(list(TASKS))
    pool = inputs_for(task)
    return task, [rng.choice(pool) for _ in range(rng.randint(1, 4))]


def test_health_tasks_and_docs(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["tasks"] == 3
    tasks = client.get("/v1/tasks").json()["tasks"]
    assert [t["name"] for t in tasks] == list(TASKS)
    for t in tasks:
        assert {"name", "labels", "nnz", "stored_bytes", "metrics", "task_type", "text_columns"} <= set(t)
        assert t["nnz"] > 0 and t["stored_bytes"] == os.path.getsize(os.path.join(t["run_dir"], "diff.safetensors"))
        assert t["metrics"]["accuracy"] > 0
    assert tasks[1]["labels"] == ["entailment", "neutral", "contradiction"]
    assert client.get("/v1/tasks/sim").json()["task_type"] == "regression"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/tasks/{task}/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert "inputs" in body["schema"]["properties"]


def test_predictions_equal_offline_merged_models(client, offline):
    for task in TASKS:
        inputs = inputs_for(task)
        r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
        assert r.status_code == 200, r.text
        assert r.json()["task"] == task
        assert check(task, inputs, r.json()["results"], offline) is None
    truncated = client.post("/v1/tasks/sim/predict", json={"inputs": PAIR_TEXTS}).json()["results"]
    assert [x["truncated"] for x in truncated] == [False, True, False]


def test_concurrent_mixed_task_requests_are_batched_and_correct(serving_env, offline):
    with make_client(serving_env, batch_wait_ms=30, max_batch_size=16) as c:
        rng = random.Random(0)
        reqs = [random_request(rng) for _ in range(48)]

        def send(req):
            task, inputs = req
            r = c.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
            return r.status_code, check(task, inputs, r.json()["results"], offline) if r.status_code == 200 else r.text

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(send, reqs))
        assert outcomes == [(200, None)] * len(reqs)
        stats = c.get("/v1/stats").json()
        assert stats["batcher"]["requests"] == len(reqs)
        assert stats["batcher"]["batches"] < len(reqs)  # requests were batched
        assert stats["model"]["switches"] <= stats["batcher"]["batches"]


BAD_REQUESTS = [
    # (task, body bytes or json, expected status)
    ("nope", {"inputs": ["a"]}, 404),
    ("sent", b'{"inputs": ["a"', 400),
    ("sent", b"", 400),
    ("sent", b"\xff\xfe not json", 400),
    ("sent", {"inputs": []}, 422),
    ("sent", {"inputs": "just a string"}, 422),
    ("sent", {"inputs": [1, 2]}, 422),
    ("sent", {"inputs": [None]}, 422),
    ("sent", {"texts": ["a"]}, 422),
    ("sent", {"inputs": ["a"], "extra": 1}, 422),
    ("sent", [1, 2], 422),
    ("nli", {"inputs": [["a", "b", "c"]]}, 422),
    ("nli", {"inputs": [["a", "b"], "c"]}, 422),
    ("nli", {"inputs": ["single text for a pair task"]}, 422),
    ("sent", {"inputs": [["pair", "for a single-text task"]]}, 422),
    ("sent", {"inputs": ["x"] * 65}, 413),
    ("sent", {"inputs": ["x" * 20_001]}, 413),
    ("sent", {"inputs": ["x" * 2_000_000]}, 413),
]


def _post(c, task, body):
    if isinstance(body, bytes):
        return c.post(f"/v1/tasks/{task}/predict", content=body, headers={"content-type": "application/json"})
    return c.post(f"/v1/tasks/{task}/predict", json=body)


@pytest.mark.parametrize("task,body,status", BAD_REQUESTS, ids=[f"{s}-{i}" for i, (_, _, s) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_its_status(client, task, body, status):
    r = _post(client, task, body)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    assert client.get("/health").status_code == 200


def test_body_limits_with_and_without_content_length(serving_env):
    with make_client(serving_env, max_body_bytes=1000) as c:
        assert _post(c, "sent", {"inputs": ["x" * 1100]}).status_code == 413  # Content-Length
        chunks = (b'{"inputs": ["' + b"x" * 600, b"x" * 600 + b'"]}')
        r = c.post("/v1/tasks/sent/predict", content=iter(chunks), headers={"content-type": "application/json"})
        assert r.status_code == 413  # streamed, no Content-Length
        assert _post(c, "sent", {"inputs": ["fine"]}).status_code == 200


def test_bad_requests_do_not_disturb_good_ones(client, offline):
    rng = random.Random(2)
    work = [("good", random_request(rng)) for _ in range(24)] + [("bad", b) for b in BAD_REQUESTS] * 2
    rng.shuffle(work)

    def send(item):
        kind, payload = item
        if kind == "bad":
            task, body, status = payload
            return _post(client, task, body).status_code == status
        task, inputs = payload
        r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
        return r.status_code == 200 and check(task, inputs, r.json()["results"], offline) is None

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(send, work))


def test_add_and_remove_tasks_while_requests_are_in_flight(serving_env, offline):
    with make_client(serving_env, batch_wait_ms=2) as c:
        stop = threading.Event()
        problems, statuses = [], []

        def load(seed):
            rng = random.Random(seed)
            for _ in range(200):
                if stop.is_set():
                    return
                task, inputs = random_request(rng)
                r = c.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
                statuses.append(r.status_code)
                if task == "nli" and r.status_code == 404:
                    continue  # nli is being removed and re-added below
                if r.status_code != 200:
                    problems.append((task, r.status_code, r.text))
                elif (err := check(task, inputs, r.json()["results"], offline)) is not None:
                    problems.append(err)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(load, s) for s in range(4)]
            for i in range(3):
                r = c.post("/v1/tasks", json={"run_dir": "sent", "name": f"sent_copy{i}"})
                assert r.status_code == 201, r.text
                assert r.json()["name"] == f"sent_copy{i}"
                r = c.post(f"/v1/tasks/sent_copy{i}/predict", json={"inputs": SINGLE_TEXTS})
                assert r.status_code == 200 and check("sent", SINGLE_TEXTS, r.json()["results"], offline) is None
                assert c.delete("/v1/tasks/nli").status_code == 200
                assert c.post("/v1/tasks", json={"run_dir": "nli"}).status_code == 201
                assert c.delete(f"/v1/tasks/sent_copy{i}").status_code == 200
            stop.set()
            for f in futures:
                f.result()
        assert problems == []
        assert statuses.count(200) > 10
        assert [t["name"] for t in c.get("/v1/tasks").json()["tasks"]] == ["sent", "sim", "nli"]


def test_adding_tasks_is_confined_to_the_diff_root(serving_env, tmp_path):
    runs = serving_env["root"] / "runs"
    with make_client(serving_env, diff_root=None) as c:
        r = c.post("/v1/tasks", json={"run_dir": str(runs / "sent"), "name": "x"})
        assert r.status_code == 403 and "--diff-root" in r.json()["detail"]
    # a diff root with an escaping symlinked directory and a symlinked file
    root = tmp_path / "root"
    (root / "inside").mkdir(parents=True)
    os.symlink(runs / "sent", root / "link_out")
    (root / "file_link").mkdir()
    for name in ("diff.safetensors", "diff_config.json"):
        os.symlink(runs / "sent" / name, root / "file_link" / name)
    os.symlink(root / "inside", root / "link_in")
    with make_client(serving_env, diff_root=str(root)) as c:
        for given in ["../", "..", "inside/../../", str(runs / "sent"), "link_out", "file_link", "/etc", "a\x00b"]:
            r = c.post("/v1/tasks", json={"run_dir": given, "name": "x"})
            assert r.status_code == 403, (given, r.text)
        assert c.post("/v1/tasks", json={"run_dir": "missing"}).status_code == 422
        r = c.post("/v1/tasks", json={"run_dir": "link_in"})  # a symlink that stays inside: not a run dir
        assert r.status_code == 422 and "no diff" in r.json()["detail"]
        assert c.post("/v1/tasks", json={"run_dir": 3}).status_code == 422
        assert c.post("/v1/tasks", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        assert c.get("/v1/tasks").json()["tasks"].__len__() == 3


def test_foreign_diff_names_and_duplicates_are_refused(client, serving_env):
    r = client.post("/v1/tasks", json={"run_dir": "foreign"})
    assert r.status_code == 422
    assert "refused" in r.json()["detail"] and "different base model" in r.json()["detail"]
    assert str(serving_env["foreign_base"]) in r.json()["detail"]
    assert client.post("/v1/tasks", json={"run_dir": "sent"}).status_code == 409
    assert client.post("/v1/tasks", json={"run_dir": "sent", "name": "bad name!"}).status_code == 422
    r = client.post("/v1/tasks", json={"run_dir": "nli", "name": "sent", "replace": True})
    assert r.status_code == 201 and r.json()["labels"] == ["entailment", "neutral", "contradiction"]
    assert client.post("/v1/tasks", json={"run_dir": "sent", "replace": True}).status_code == 201
    assert client.delete("/v1/tasks/nope").status_code == 404
    assert [t["name"] for t in client.get("/v1/tasks").json()["tasks"]] == list(TASKS)
