"""Serving causal LMs: generation tasks on one in-place-switched base, behind OpenAI-compatible endpoints.

A real uvicorn server on 127.0.0.1 (in a thread) and the real `openai` client: greedy completions and
chat completions equal the merged single-task model's greedy output token for token; streamed chunks
add up to the non-streamed text; concurrent requests batch and stay correct; a client that
disconnects mid-stream stops its generation without disturbing others; errors come in OpenAI's shape.
A classifier base and a causal base are served side by side by one app (`TaskRouter`).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from diffprune import DiffModel, DiffPruningConfig, MultiTaskModel, SparseDiff  # noqa: E402
from diffprune.generation import TextDeltaStreamer  # noqa: E402
from diffprune.errors import TaskError, TaskTypeError  # noqa: E402
from diffprune.serving.router import TaskRouter  # noqa: E402
from diffprune.serving.server import create_app  # noqa: E402

from .serving_fixtures import SINGLE_TEXTS, build_runs, live, serve_process  # noqa: E402
from .tiny_models import save_tiny_causal  # noqa: E402

MAX_LEN = 64  # the tasks' max_seq_length (prompt tokens)
NEW = 8  # max_tokens of most requests
PROMPTS = ["the quick brown fox", "question: is the sky blue? answer:", "dog ->", "hello", "a b c d e"]
MESSAGES = [
    [{"role": "user", "content": "is fire cold?"}],
    [{"role": "system", "content": "answer briefly."}, {"role": "user", "content": "translate to french: cat"}],
]


# ---- fixtures ----------------------------------------------------------------------------------------
def make_causal_run(base_dir: Path, run_dir: Path, task: str, seed: int) -> Path:
    """A causal-LM diff run on `base_dir`: random values at 5% of the entries (outputs differ from the base's)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    dm = DiffModel(base, DiffPruningConfig(structured=True, head_parameters=[], target_sparsity=0.05))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for slot in dm.slots.values():
            slot.w.copy_(torch.randn(slot.w.shape, generator=g) * 0.5)
    dm.project()
    dm.save_pretrained(run_dir, extra={
        "family": "causal-lm", "task_type": "generation", "base_model": str(base_dir), "task": task,
        "max_seq_length": MAX_LEN, "data_format": "prompt_completion", "method": "diff_pruning",
    })
    return run_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal_serving")
    llama = save_tiny_causal("llama", root / "llama")
    gpt2 = save_tiny_causal("gpt2", root / "gpt2")
    runs = {
        "alpha": make_causal_run(llama, root / "runs" / "alpha", "alpha", seed=1),
        "beta": make_causal_run(llama, root / "runs" / "beta", "beta", seed=2),
        "tied": make_causal_run(gpt2, root / "runs" / "tied", "tied", seed=3),
    }
    classifier = build_runs(tmp_path_factory.getbasetemp() / "serving_runs")
    return {"root": root, "llama": llama, "gpt2": gpt2, "runs": runs, "classifier": classifier}


class Reference:
    """The merged single-task model of each task (fresh base + diff, merged), one prompt at a time."""

    def __init__(self, env):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.env, self.models = env, {}
        self.tokenizer = AutoTokenizer.from_pretrained(env["llama"])
        self.loader = AutoModelForCausalLM

    def model(self, task):
        if task not in self.models:
            base_dir = self.env["gpt2"] if task == "tied" else self.env["llama"]
            fresh = self.loader.from_pretrained(base_dir).eval()
            diff = SparseDiff.load(self.env["runs"][task])
            self.models[task] = DiffModel.from_sparse_diff(fresh, diff).merge_and_unload().eval()
        return self.models[task]

    def ids(self, task, ids, new=NEW) -> list[int]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = self.model(task).generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                                            pad_token_id=self.tokenizer.pad_token_id)
        gen = out[0, len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        return gen[: gen.index(eos) + 1] if eos in gen else gen

    def text(self, task, ids, new=NEW) -> str:
        return self.tokenizer.decode(self.ids(task, ids, new), skip_special_tokens=True)

    def prompt_ids(self, prompt=None, messages=None) -> list[int]:
        from diffprune.lmdata import render_prompt

        return list(render_prompt(self.tokenizer, prompt=prompt, messages=messages))


@pytest.fixture(scope="module")
def ref(env):
    return Reference(env)


@pytest.fixture(scope="module")
def served(env):
    """One app: the classifier base (task "sent") and the tiny Llama base (tasks "alpha", "beta")."""
    causal = MultiTaskModel.from_run_dirs({"alpha": env["runs"]["alpha"], "beta": env["runs"]["beta"]})
    classifier = MultiTaskModel.from_run_dirs({"sent": env["classifier"]["runs"]["sent"]})
    router = TaskRouter([classifier, causal])
    app = create_app(router, batch_wait_ms=40, max_new_tokens=120, diff_root=str(env["root"] / "runs"))
    with live(app) as url:
        yield {"url": url, "router": router, "causal": causal, "classifier": classifier}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key="x", max_retries=0, timeout=60)


# ---- MultiTaskModel.generate ---------------------------------------------------------------------------
def test_generate_equals_merged_models_token_for_token(served, ref):
    causal = served["causal"]
    prompts = [ref.prompt_ids(prompt=p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # several lengths: one generate per length, no padding
    causal.deactivate()
    base_state = {n: p.detach().clone() for n, p in causal.model.named_parameters()}
    outputs = {}
    for task in ["alpha", "beta", "alpha"]:  # switching back and forth
        results = causal.generate(task, prompts + prompts[:2], max_new_tokens=NEW)
        for ids, r in zip(prompts + prompts[:2], results):
            want = ref.ids(task, ids)
            assert r["token_ids"] == want, (task, ids)
            assert r["text"] == ref.tokenizer.decode(want, skip_special_tokens=True)
            assert r["prompt_tokens"] == len(ids) and r["completion_tokens"] == len(want)
            assert r["finish_reason"] == ("stop" if want[-1] == ref.tokenizer.eos_token_id else "length")
        outputs[task] = [r["token_ids"] for r in results]
    assert outputs["alpha"] != outputs["beta"]  # two diffs, two behaviours
    base_outputs = []
    causal.deactivate()
    for n, p in causal.model.named_parameters():
        assert torch.equal(p, base_state[n]), n  # the base is restored bit-exactly
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            base_outputs.append(causal.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                                                      do_sample=False, pad_token_id=0)[0, len(ids):].tolist())
    assert base_outputs != outputs["alpha"][: len(prompts)]
    # seeded sampling is reproducible; the global RNG is left as it was
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = causal.generate("alpha", [prompts[0]], max_new_tokens=NEW, temperature=1.0, seed=3)
    b = causal.generate("beta", [prompts[0]], max_new_tokens=NEW, temperature=1.0, seed=3)
    c = causal.generate("alpha", [prompts[0]], max_new_tokens=NEW, temperature=1.0, seed=3)
    assert torch.equal(torch.rand(1), before)
    assert a == c and a != b


def test_generation_and_classifier_calls_are_refused_on_the_other_kind(served, env):
    causal, classifier = served["causal"], served["classifier"]
    with pytest.raises(TaskTypeError, match="generation task .* /v1/completions"):
        causal.predict("alpha", ["a text"])
    with pytest.raises(TaskTypeError, match="'sent' is a classification task .*predict"):
        classifier.generate("sent", [[1, 2, 3]])
    with pytest.raises(TaskError, match="causal-lm run but this model's base is a classifier"):
        classifier.add_task("x", env["runs"]["alpha"])
    with pytest.raises(TaskError, match="no causal-lm base|causal-lm run"):
        TaskRouter([classifier]).add_task("x", env["runs"]["alpha"])
    with pytest.raises(TaskError, match="max_seq_length"):
        causal.generate("alpha", [[5] * (MAX_LEN + 1)])
    with pytest.raises(TaskError, match="empty"):
        causal.generate("alpha", [[]])


def test_streamer_pieces_add_up_to_the_text_with_stop_strings(served, ref):
    causal = served["causal"]
    ids = ref.prompt_ids(prompt=PROMPTS[1])
    full = causal.generate("alpha", [ids], max_new_tokens=NEW)[0]["text"]
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    for stops in ([], [stop]):
        streamer = TextDeltaStreamer(causal.tokenizer, stop=stops)
        r = causal.generate("alpha", [ids], max_new_tokens=NEW, stop=stops, streamer=streamer)[0]
        assert "".join(streamer) == r["text"] == (full[: full.find(stop)] if stops else full)
        assert r["finish_reason"] == ("stop" if stops else causal.generate("alpha", [ids], max_new_tokens=NEW)[0]["finish_reason"])


# ---- OpenAI endpoints ---------------------------------------------------------------------------------------
def test_models_list_every_task(client, served):
    models = client.models.list()
    assert [m.id for m in models.data] == ["sent", "alpha", "beta"]
    assert all(m.object == "model" and m.owned_by == "diffprune" and m.created > 0 for m in models.data)
    flags = {m.id: m.model_extra["generation"] for m in models.data}
    assert flags == {"sent": False, "alpha": True, "beta": True}
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_completions_greedy_equal_merged_models(client, ref):
    for task in ("alpha", "beta"):
        for prompt in PROMPTS:
            ids = ref.prompt_ids(prompt=prompt)
            want = ref.ids(task, ids)
            r = client.completions.create(model=task, prompt=prompt, max_tokens=NEW, temperature=0)
            assert r.object == "text_completion" and r.model == task
            assert r.choices[0].text == ref.tokenizer.decode(want, skip_special_tokens=True), (task, prompt)
            assert r.choices[0].finish_reason == ("stop" if want[-1] == ref.tokenizer.eos_token_id else "length")
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    # several prompts: one choice each, in order; token-id prompts too
    r = client.completions.create(model="alpha", prompt=PROMPTS, max_tokens=NEW, temperature=0)
    assert [c.index for c in r.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in r.choices] == [ref.text("alpha", ref.prompt_ids(prompt=p)) for p in PROMPTS]
    ids = ref.prompt_ids(prompt=PROMPTS[0])
    r = client.completions.create(model="alpha", prompt=ids, max_tokens=NEW, temperature=0)
    assert r.choices[0].text == ref.text("alpha", ids)


def test_chat_completions_greedy_equal_merged_models(client, ref):
    for task in ("alpha", "beta"):
        for messages in MESSAGES:
            ids = ref.prompt_ids(messages=messages)
            r = client.chat.completions.create(model=task, messages=messages, max_tokens=NEW, temperature=0)
            assert r.object == "chat.completion"
            assert r.choices[0].message.role == "assistant"
            assert r.choices[0].message.content == ref.text(task, ids), (task, messages)
            assert r.usage.prompt_tokens == len(ids)
    r = client.chat.completions.create(model="alpha", messages=MESSAGES[0], max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_streaming_equals_non_streamed(client, ref):
    for prompt in PROMPTS[:3]:
        whole = client.completions.create(model="beta", prompt=prompt, max_tokens=NEW, temperature=0)
        chunks = list(client.completions.create(model="beta", prompt=prompt, max_tokens=NEW, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    for messages in MESSAGES:
        whole = client.chat.completions.create(model="alpha", messages=messages, max_tokens=NEW, temperature=0)
        chunks = list(client.chat.completions.create(model="alpha", messages=messages, max_tokens=NEW, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == whole.choices[0].message.content
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_strings_cut_and_stop(client, ref):
    prompt = PROMPTS[0]
    full = client.completions.create(model="alpha", prompt=prompt, max_tokens=NEW, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    want = full[: full.find(stop)]
    r = client.completions.create(model="alpha", prompt=prompt, max_tokens=NEW, temperature=0, stop=[stop, "never!"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < NEW or len(want) < len(full)
    chunks = list(client.completions.create(model="alpha", prompt=prompt, max_tokens=NEW, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_errors_have_openai_shape_and_name_the_field(client, served):
    with pytest.raises(openai.NotFoundError, match="does not exist.*alpha"):
        client.completions.create(model="nope", prompt="x", max_tokens=NEW)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES[0])
    cases = [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "user"}]), "messages.0.content"),
        (dict(messages=[{"role": "robot", "content": "x"}]), "messages.0.role"),
        (dict(messages=MESSAGES[0], max_tokens=0), "max_tokens"),
        (dict(messages=MESSAGES[0], max_tokens=10_000), "max_tokens"),
        (dict(messages=MESSAGES[0], n=2), "n"),
        (dict(messages=MESSAGES[0], temperature=7), "temperature"),
        (dict(messages=[{"role": "user", "content": "x " * 100}]), "max_seq_length"),
    ]
    for kwargs, needle in cases:
        with pytest.raises((openai.BadRequestError, openai.UnprocessableEntityError)) as e:
            client.chat.completions.create(model="alpha", **kwargs)
        assert needle in str(e.value), (kwargs, str(e.value))
    with pytest.raises(openai.BadRequestError, match="'sent' is a classification task"):
        client.completions.create(model="sent", prompt="x", max_tokens=NEW)
    with pytest.raises(openai.BadRequestError, match="stream=true takes one prompt"):
        client.completions.create(model="alpha", prompt=["a", "b"], stream=True)
    url = served["url"]
    raw = [
        (b'{"model": "alpha", "prompt": ', None, 400, "malformed JSON"),
        (b"[1]", None, 400, "JSON object"),
        (None, {"model": "alpha"}, 400, "prompt"),
        (None, {"model": "alpha", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        (None, {"model": "alpha", "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
        (None, {"model": "alpha", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
        (None, {"model": "alpha", "prompt": ""}, 400, "empty"),
        (None, {"model": "alpha", "prompt": "x", "max_tokens": 110, "stop": ["a"] * 5}, 400, "stop"),
    ]
    for content, body, status, needle in raw:
        r = (httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
             if content is not None else httpx.post(f"{url}/v1/completions", json=body))
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err
    r = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "x", "temperature": "hot"})
    assert r.json()["error"]["param"] == "temperature"
    assert httpx.get(f"{url}/v1/completions").json()["error"]["type"] == "invalid_request_error"  # 405


def test_concurrent_requests_batch_and_equal_one_by_one(client, served, ref):
    jobs = [(task, p) for task in ("alpha", "beta") for p in PROMPTS] * 2
    want = {(t, p): ref.text(t, ref.prompt_ids(prompt=p)) for t, p in set(jobs)}
    before = served["router"].stats.to_dict()
    barrier = threading.Barrier(len(jobs))

    def send(job):
        task, prompt = job
        barrier.wait()
        return client.completions.create(model=task, prompt=prompt, max_tokens=NEW, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(send, jobs))
    assert got == [want[j] for j in jobs]
    after = served["router"].stats.to_dict()
    calls, prompts = after["generate_calls"] - before["generate_calls"], after["prompts"] - before["prompts"]
    assert prompts == len(jobs) and calls < prompts  # equal-length prompts of a task shared generate calls


def test_client_disconnecting_mid_stream_stops_its_generation(client, served, ref):
    url = served["url"]
    long_new = 100
    prompt = next(p for p in PROMPTS if len(ref.ids("alpha", ref.prompt_ids(prompt=p), long_new)) == long_new)
    hook = served["causal"].model.register_forward_pre_hook(lambda *a: time.sleep(0.01))  # ~1 s for 100 tokens
    before = httpx.get(f"{url}/v1/stats").json()
    try:
        other = {}

        def other_client():
            time.sleep(0.1)
            other["text"] = client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=NEW,
                                                      temperature=0).choices[0].text

        t = threading.Thread(target=other_client)
        t.start()
        body = {"model": "alpha", "prompt": prompt, "max_tokens": long_new, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"
        # the generation for the stream notices and stops; the other request still answers correctly
        deadline = time.monotonic() + 20
        while httpx.get(f"{url}/v1/stats").json()["batcher"]["cancelled_generations"] == before["batcher"]["cancelled_generations"]:
            assert time.monotonic() < deadline, "the disconnected stream's generation did not stop"
            time.sleep(0.05)
        t.join(timeout=30)
        assert other["text"] == ref.text("beta", ref.prompt_ids(prompt=PROMPTS[2]))
        after = httpx.get(f"{url}/v1/stats").json()
        assert after["model"]["generated_tokens"] - before["model"]["generated_tokens"] < long_new
    finally:
        hook.remove()
    r = client.completions.create(model="alpha", prompt=PROMPTS[3], max_tokens=NEW, temperature=0)
    assert r.choices[0].text == ref.text("alpha", ref.prompt_ids(prompt=PROMPTS[3]))


def test_classifier_and_causal_tasks_on_one_app(client, served, ref):
    url = served["url"]
    local = served["classifier"].predict("sent", SINGLE_TEXTS)
    r = httpx.post(f"{url}/v1/tasks/sent/predict", json={"inputs": SINGLE_TEXTS})
    assert r.status_code == 200
    assert [x["label"] for x in r.json()["results"]] == [x["label"] for x in local]
    r = httpx.post(f"{url}/v1/tasks/alpha/predict", json={"inputs": ["a"]})
    assert r.status_code == 422 and "generation task" in r.json()["detail"]
    tasks = {t["name"]: t for t in httpx.get(f"{url}/v1/tasks").json()["tasks"]}
    assert {n: (t["family"], t["task_type"]) for n, t in tasks.items()} == {
        "sent": ("classifier", "classification"), "alpha": ("causal-lm", "generation"), "beta": ("causal-lm", "generation")}
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["tasks"] == 3
    assert [b["family"] for b in health["bases"]] == ["classifier", "causal-lm"]
    r = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert r.choices[0].text == ref.text("alpha", ref.prompt_ids(prompt=PROMPTS[0]))
    # a causal run added at run time goes to the causal base; one of another base is refused
    r = httpx.post(f"{url}/v1/tasks", json={"run_dir": "alpha", "name": "alpha2"})
    assert r.status_code == 201 and r.json()["family"] == "causal-lm", r.text
    try:
        r = client.completions.create(model="alpha2", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
        assert r.choices[0].text == ref.text("alpha", ref.prompt_ids(prompt=PROMPTS[0]))
        r = httpx.post(f"{url}/v1/tasks", json={"run_dir": "tied", "name": "tied"})
        assert r.status_code == 422 and "different base model" in r.json()["detail"]
    finally:
        assert httpx.delete(f"{url}/v1/tasks/alpha2").status_code == 200


def test_gpt2_with_tied_embeddings(env, ref):
    model = MultiTaskModel.from_run_dirs([env["runs"]["tied"]])
    assert any("wte" in n for n in SparseDiff.load(env["runs"]["tied"]).shapes)  # the tied matrix is diffed
    with live(create_app(model)) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        for prompt in PROMPTS[:3]:
            r = c.completions.create(model="tied", prompt=prompt, max_tokens=NEW, temperature=0)
            assert r.choices[0].text == ref.text("tied", ref.prompt_ids(prompt=prompt))
        r = c.chat.completions.create(model="tied", messages=MESSAGES[1], max_tokens=NEW, temperature=0)
        assert r.choices[0].message.content == ref.text("tied", ref.prompt_ids(messages=MESSAGES[1]))


def test_cli_refuses_an_ambiguous_base_model(env, capsys):
    from diffprune.cli import main

    runs = [str(env["classifier"]["runs"]["sent"]), str(env["runs"]["alpha"])]
    assert main(["serve", *runs, "--base-model", str(env["llama"])]) == 2
    assert "--family" in capsys.readouterr().err
    assert main(["serve", str(env["runs"]["alpha"]), "--family", "classifier", "--base-model", "x"]) == 2
    assert "no RUN_DIR is a classifier run" in capsys.readouterr().err


def test_cli_serves_classifier_and_causal_runs_together(env, ref, tmp_path):
    args = [env["classifier"]["runs"]["sent"], env["runs"]["alpha"], f"second={env['runs']['beta']}", "--threads", "1",
            "--log-level", "warning", "--max-new-tokens", "20"]
    with serve_process(args, tmp_path / "server.log") as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["sent", "alpha", "second"]
        r = c.completions.create(model="second", prompt=PROMPTS[1], max_tokens=NEW, temperature=0)
        assert r.choices[0].text == ref.text("beta", ref.prompt_ids(prompt=PROMPTS[1]))
        with pytest.raises(openai.BadRequestError, match="20"):
            c.completions.create(model="alpha", prompt="x", max_tokens=21)
        assert httpx.post(f"{base}/v1/tasks/sent/predict", json={"inputs": ["good"]}).status_code == 200
