"""The README's library snippet runs as written (in a temporary directory), with real assertions on what
it leaves behind."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _library_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_library_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_library_snippet(), "README.md (Library)", "exec"), scope)
    assert (tmp_path / "my-task" / "diff.safetensors").exists()
    diff, dm, plain = scope["diff"], scope["dm"], scope["plain"]
    assert diff.nnz == round(0.005 * diff.n_diffed)
    batch = {k: v for k, v in scope["loader"][0].items() if k != "labels"}
    with torch.no_grad():
        other = scope["other"]
        reference = scope["AutoModelForSequenceClassification"].from_pretrained(scope["path"], num_labels=2)
        for (n, a), (_, b) in zip(other.named_parameters(), reference.named_parameters()):
            if not n.startswith("classifier"):
                assert torch.equal(a, b), n  # reverted bit-exactly
        diff.apply_(other)  # the merged model and base + diff give the same outputs
        assert torch.allclose(plain.eval()(**batch).logits, other.eval()(**batch).logits, atol=1e-5)
        diff.revert_(other)


def _console_commands(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    body = text[text.index(section):]
    block = re.search(r"```console\n(.*?)```", body, re.S).group(1)
    commands, current = [], None
    for line in block.splitlines():
        if line.startswith("$ "):
            current = line[2:]
        elif current is not None and line.startswith("    "):
            current += " " + line.strip()
        else:
            continue
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        commands.append(current)
        current = None
    return commands


def test_causal_lm_session_runs_as_written(tmp_path):
    """The README's causal-LM console session, command by command, in a fresh directory."""
    import os
    import subprocess
    import sys

    commands = _console_commands("## Causal language models")
    assert commands[0] == "python -m diffprune.tiny llama demo" and len(commands) == 5
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    outputs = []
    for cmd in commands:
        cmd = cmd.split("  #")[0].replace("python ", f"{sys.executable} ", 1)
        r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
        outputs.append(r.stdout)
    assert '"method": "structured"' in outputs[1] and "exact_match" in outputs[1]
    assert "budget round(0.05 x" in outputs[2]
    assert (tmp_path / "qa-merged" / "config.json").exists()
