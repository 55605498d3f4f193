"""`diffprune serve`: a real uvicorn server on 127.0.0.1 (free port), and the CLI's refusals."""

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from diffprune import MultiTaskModel  # noqa: E402
from diffprune.cli import main  # noqa: E402

from .serving_fixtures import PAIR_TEXTS, SINGLE_TEXTS, TASKS, serving_env  # noqa: E402, F401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_uvicorn_on_localhost(serving_env, tmp_path):
    runs = serving_env["runs"]
    port = _free_port()
    log = open(tmp_path / "server.log", "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "diffprune", "serve", str(runs["sent"]), f"pairs={runs['nli']}", str(runs["sim"]),
           "--port", str(port), "--diff-root", str(serving_env["root"] / "runs"), "--threads", "1",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, open(tmp_path / "server.log").read()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
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
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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
