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
