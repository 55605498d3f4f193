"""The method registry: one entry per method, and everything else (CLI choices, default learning
rates, run-directory loading, model card) reads it."""

import pytest

from diffprune import runs
from diffprune.errors import ConfigError
from diffprune.methods import ARTEFACTS, METHODS, get_method, method_of_artefact
from diffprune.modelcard import _METHOD_TEXT
from diffprune.training import DEFAULT_LR, TrainConfig


def test_registry_is_the_one_list_of_methods():
    assert list(METHODS) == ["diff", "structured", "magnitude", "full", "lora", "bitfit", "shira"]
    assert runs.METHODS == tuple(METHODS) and runs.DIFF_METHODS == ("diff", "structured", "magnitude", "bitfit")
    assert DEFAULT_LR == {"diff": 5e-4, "structured": 1e-4, "magnitude": 5e-5, "full": 5e-5, "lora": 1e-3,
                          "bitfit": 1e-3, "shira": 1e-3}
    assert _METHOD_TEXT["structured"].startswith("structured diff pruning")
    assert [method_of_artefact(a).name for a in ARTEFACTS] == ["diff", "lora", "full"]
    with pytest.raises(ConfigError, match="--method 'adapters' is not one of diff, structured"):
        get_method("adapters")


def test_candidates_have_their_own_default_lr_and_an_explicit_lr_wins():
    # structured with --candidates: w (and the head) at 5e-4, 5x the dense default (memory_accuracy.md: CoLA
    # 25.7 at 1e-4, 35.2 at 5e-4); diff keeps its 5e-4; --lr given is taken as it is
    cand = TrainConfig(output_dir="x", candidates=0.05, epochs=3, fixmask_epochs=2)
    assert [(p.name, p.lr) for p in get_method("structured").phases(cand)] == [("l0", 5e-4), ("fixed", 5e-4)]
    assert TrainConfig(output_dir="x", candidates=0.05, lr=1e-4).resolved_lr() == 1e-4
    assert TrainConfig(output_dir="x", method="diff", candidates=0.05).resolved_lr() == 5e-4
    assert TrainConfig(output_dir="x").resolved_lr() == 1e-4


@pytest.mark.parametrize("name, phases", [("structured", [("l0", 3, 1e-4), ("fixed", 2, 5e-4)]),
                                          ("magnitude", [("l0", 3, 5e-5), ("fixed", 2, 5e-4)]),
                                          ("full", [("train", 3, 5e-5)]), ("lora", [("train", 3, 1e-3)]),
                                          ("bitfit", [("fixed", 3, 1e-3)]), ("shira", [("train", 3, 1e-3)])])
def test_phases_per_method(name, phases):
    cfg = TrainConfig(output_dir="x", method=name, epochs=3, fixmask_epochs=2)
    got = [(p.name, p.epochs, p.lr) for p in get_method(name).phases(cfg)]
    assert got == phases
    assert get_method(name).projects == (name in runs.DIFF_METHODS and name != "bitfit")
