"""`diffprune serve`: a real uvicorn server on 127.0.0.1 (free port), and the CLI's refusals."""


import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from diffprune import MultiTaskModel  # noqa: E402
from diffprune.cli import main  # noqa: E402

from .serving_fixtures import PAIR_TEXTS, SINGLE_TEXTS, TASKS, serve_process, serving_env  # noqa: E402, F401


def test_serve_runs_uvicorn_on_localhost(serving_env, tmp_path):
    runs = serving_env["runs"]
    args = [runs["sent"], f"pairs={runs['nli']}", runs["sim"], "--diff-root", serving_env["root"] / "runs",
            "--threads", "1", "--log-level", "warning"]
    with serve_process(args, tmp_path / "server.log") as base:
        with httpx.Client(base_url=base, timeout=30) as c:
            assert [t["name"] for t in c.get("/v1/tasks").json()["tasks"]] == ["sent", "pairs", "sim"]
            assert c.get("/docs").status_code == 200
            local = MultiTaskModel.from_run_dirs({"sent": runs["sent"], "pairs": runs["nli"]})
            for task, inputs in (("sent", SINGLE_TEXTS), ("pairs", PAIR_TEXTS)):
                r = c.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs})
                assert r.status_code == 200, r.text
                for got, want in zip(r.json()["results"], local.predict(task, inputs)):
                    assert got["label"] == want["label"] and got["truncated"] == want["truncated"]
                    assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert c.post("/v1/tasks/sent/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
            assert c.post("/v1/tasks/nope/predict", json={"inputs": ["a"]}).status_code == 404
            r = c.post("/v1/tasks", json={"run_dir": "foreign"})
            assert r.status_code == 422 and "different base model" in r.json()["detail"]
            assert c.get("/health").json()["status"] == "ok"


def test_cli_refusals(serving_env, capsys):
    runs = serving_env["runs"]
    assert main(["serve", str(runs["sent"]), str(serving_env["foreign"]), "--port", "1"]) == 2
    assert "different base model" in capsys.readouterr().err
    assert main(["serve", str(runs["sent"]), str(runs["sent"])]) == 2
    assert "NAME=RUN_DIR" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert main(["serve", str(serving_env["root"] / "missing")]) == 2
    assert "no diff at" in capsys.readouterr().err
    assert main(["serve", str(runs["sent"]), "--diff-root", str(serving_env["root"] / "missing")]) == 2
    assert main(["serve", str(runs["sent"]), "--max-batch-size", "0"]) == 2
