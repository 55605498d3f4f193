"""MultiTaskModel: one base, several diffs with different heads; predictions equal the merged models'."""

import random
import threading

import pytest
import torch

from diffprune import BaseModelMismatchError, MultiTaskModel, SparseDiff
from diffprune.serving import InputError, TaskError, TaskExistsError, UnknownTaskError

from .serving_fixtures import (  # noqa: F401  (serving_env is a fixture)
    MAX_LEN,
    PAIR_TEXTS,
    SINGLE_TEXTS,
    TASKS,
    inputs_for,
    merged_model,
    reference_logits,
    serving_env,
)


@pytest.fixture(scope="module")
def mtm(serving_env):
    return MultiTaskModel.from_run_dirs(list(serving_env["runs"].values()))


@pytest.fixture(scope="module")
def merged(serving_env):
    return {t: merged_model(serving_env["base"], d) for t, d in serving_env["runs"].items()}


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_predictions_equal_merged_models_bit_exactly(mtm, merged):
    assert mtm.tasks() == list(TASKS)
    for _ in range(2):  # after switching back and forth too
        for task in reversed(mtm.tasks()):
            inputs = inputs_for(task)
            encoded, truncated = mtm.encode(task, inputs)
            got = mtm.logits(task, encoded)
            ref = reference_logits(merged[task], mtm.tokenizer, inputs)
            assert torch.equal(got, ref), task
            results = mtm.predict(task, inputs)
            assert len(results) == len(inputs)
            if TASKS[task]["task_type"] == "regression":
                assert [r["value"] for r in results] == pytest.approx(ref[:, 0].tolist(), abs=1e-6)
                assert set(results[0]) == {"value", "truncated"}
            else:
                probs = torch.softmax(ref.double(), -1)
                labels = TASKS[task]["labels"]
                for r, p in zip(results, probs):
                    assert r["label_id"] == int(p.argmax()) and r["label"] == labels[r["label_id"]]
                    assert r["score"] == pytest.approx(float(p.max()), abs=1e-6)
                    assert list(r["scores"]) == labels
                    assert list(r["scores"].values()) == pytest.approx(p.tolist(), abs=1e-6)
    # the heads really differ in shape: 2, 3 and 1 outputs
    assert [mtm.logits(t, mtm.encode(t, inputs_for(t))[0]).shape[1] for t in TASKS] == [2, 3, 1]


def test_switching_restores_the_base_bit_exactly(serving_env):
    model = MultiTaskModel(serving_env["base"])
    before = _state(model.model)
    head_objects = {n: p for n, p in model.model.named_parameters() if n.startswith("classifier")}
    for task, run in serving_env["runs"].items():
        model.add_task(task, run)
    assert _state(model.model).keys() == before.keys()
    rng = random.Random(0)
    for _ in range(25):
        task = rng.choice(model.tasks())
        model.activate(task)
        assert model.active_task == task
    model.deactivate()
    after = _state(model.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {n: p for n, p in model.model.named_parameters() if n.startswith("classifier")} == head_objects
    assert model.stats.switches >= 10


def test_concurrent_mixed_tasks_equal_merged_models(mtm, merged):
    rng = random.Random(1)
    plan = []
    for _ in range(60):
        task = rng.choice(list(TASKS))
        pool = inputs_for(task)
        plan.append((task, rng.sample(pool, rng.randint(1, len(pool)))))
    refs = [reference_logits(merged[t], mtm.tokenizer, x) for t, x in plan]
    errors, lock = [], threading.Lock()

    def worker(k):
        for i in range(k, len(plan), 6):
            task, inputs = plan[i]
            encoded, _ = mtm.encode(task, inputs)
            got = mtm.logits(task, encoded)
            if not torch.allclose(got, refs[i], atol=1e-5, rtol=0):
                with lock:
                    errors.append((i, task, (got - refs[i]).abs().max().item()))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_diff_for_another_base_is_refused(mtm, serving_env):
    tasks = mtm.tasks()
    with pytest.raises(BaseModelMismatchError, match="different base model") as e:
        mtm.add_task("foreign", serving_env["foreign"])
    assert str(serving_env["foreign_base"]) in str(e.value)
    assert mtm.tasks() == tasks
    # and a diff whose head does not fit the architecture
    diff = SparseDiff.load(serving_env["runs"]["sent"])
    diff.head["classifier.weight"] = torch.zeros(2, 7)
    with pytest.raises(BaseModelMismatchError, match="only the first"):
        mtm.add_task("badhead", diff)
    diff = SparseDiff.load(serving_env["runs"]["sent"])
    diff.head["not_a_module.weight"] = torch.zeros(2)
    with pytest.raises(BaseModelMismatchError, match="no parameter"):
        mtm.add_task("badhead", diff)
    assert mtm.tasks() == tasks


def test_add_remove_replace_and_unknown(serving_env, merged):
    model = MultiTaskModel(serving_env["base"], {"s": serving_env["runs"]["sent"]})
    assert model.tasks() == ["s"]
    info = model.task_info("s")
    assert info["labels"] == ["negative", "positive"] and info["nnz"] > 0 and info["stored_bytes"] > 0
    assert info["metrics"] == {"accuracy": pytest.approx(0.6)}
    assert info["memory_bytes"] == 12 * info["nnz"] + (2 * 32 + 2) * 4
    with pytest.raises(TaskExistsError):
        model.add_task("s", serving_env["runs"]["nli"])
    model.predict("s", SINGLE_TEXTS[:1])
    assert model.active_task == "s"
    model.add_task("s", serving_env["runs"]["nli"], replace=True)  # now an NLI task under that name
    enc, _ = model.encode("s", PAIR_TEXTS)
    assert torch.equal(model.logits("s", enc), reference_logits(merged["nli"], model.tokenizer, PAIR_TEXTS))
    removed = model.remove_task("s")
    assert removed["name"] == "s" and model.tasks() == [] and model.active_task is None
    with pytest.raises(UnknownTaskError, match="unknown task 's'"):
        model.predict("s", ["x"])
    with pytest.raises(UnknownTaskError):
        model.remove_task("s")
    with pytest.raises(TaskError, match="invalid task name"):
        model.add_task("no/slashes", serving_env["runs"]["sent"])
    base = MultiTaskModel(serving_env["base"]).model  # the base is untouched by all that (heads are random)
    shared = [n for n, _ in base.named_parameters() if not n.startswith("classifier")]
    assert all(torch.equal(model.model.get_parameter(n), base.get_parameter(n)) for n in shared)


def test_inputs_must_fit_the_task_and_truncation_is_reported(mtm):
    with pytest.raises(InputError, match="takes single texts"):
        mtm.predict("sent", PAIR_TEXTS)
    with pytest.raises(InputError, match="takes text pairs"):
        mtm.predict("nli", SINGLE_TEXTS)
    with pytest.raises(InputError, match="mix"):
        mtm.predict("nli", [PAIR_TEXTS[0], "x"])
    with pytest.raises(InputError, match="non-empty"):
        mtm.predict("sent", [])
    long = " ".join(["word"] * (MAX_LEN + 5))
    results = mtm.predict("sent", ["short", long])
    assert [r["truncated"] for r in results] == [False, True]
    assert [r["truncated"] for r in mtm.predict("sim", PAIR_TEXTS)] == [False, True, False]


def test_memory_is_one_base_plus_small_per_task_state(mtm):
    report = mtm.memory_report()
    n_params = sum(p.numel() for p in mtm.model.parameters())
    assert report["base_bytes"] >= 4 * n_params
    per_task = report["task_bytes"]
    assert set(per_task) == set(TASKS)
    # 12 bytes per nonzero (int32 position, merged and base value) plus the head: ~4% of the base each here
    assert sum(per_task.values()) < 0.15 * report["base_bytes"]
