"""`DiffPruningConfig`: every hyperparameter of diff pruning, with a JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

GROUP_PENALTIES = ("expected_l0", "per_gate")
"""The forms of the structured penalty (`DiffPruningConfig.group_penalty`)."""

# Task heads that transformers initialises fresh for a new task. They are trained densely
# and stored whole, not diffed (METHOD.md: "The task-specific classifier head is new").
DEFAULT_HEAD_PATTERNS = ("classifier", "pre_classifier", "score", "qa_outputs")


def is_glob(pattern: str) -> bool:
    """Whether a parameter pattern is read as a glob: it uses * or ? and is no valid regular expression
    (``"*_proj"``, ``"**.mlp.**"``). A valid regex stays one (``"layers.*.mlp"`` means nearly the same
    either way)."""
    if not re.search(r"[*?]", pattern):
        return False
    try:
        re.compile(pattern)
        return False
    except re.error:
        return True


def pattern_regex(pattern: str) -> str:
    """The regular expression of a parameter pattern (a glob translated: * within a component, ** across)."""
    if not is_glob(pattern):
        return pattern
    out = []
    for part in re.split(r"(\*\*|\*|\?)", pattern):
        out.append({"**": ".*", "*": "[^.]*", "?": "[^.]"}.get(part, re.escape(part)))
    return "".join(out)


def check_patterns(what: str, patterns) -> None:
    """ConfigError naming `what` unless `patterns` is a list of valid patterns (globs or regexes)."""
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise ConfigError(f"{what} must be a list of patterns, not {patterns!r}")
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"{what}: pattern {p!r} must be a non-empty string")
        try:
            re.compile(pattern_regex(p))
        except re.error as e:
            raise ConfigError(f"{what}: pattern {p!r} is not a valid regular expression or glob ({e})") from e


@dataclass
class DiffPruningConfig:
    """Hyperparameters of diff pruning (defaults: METHOD.md, BERT-large settings).

    Parameter selection uses name patterns, matched against whole dotted components of a parameter
    name: ``"classifier"`` matches ``classifier.weight`` and ``model.classifier.dense.bias`` but not
    ``my_classifier.weight``. A pattern is a regular expression (``"encoder\\.layer\\.0"``,
    ``"q_proj|v_proj"``, ``"layers.*.mlp"``) or, when it is no valid regex, a glob in which ``*`` is
    one component or part of one and ``**`` any run of components (``"*_proj"``, ``"**.self_attn.**"``).
    """

    target_sparsity: float = 0.005
    """Fraction of diffed entries kept nonzero by `DiffModel.project()` (0.005 = 0.5%)."""
    l0_lambda: float = 1.25e-7
    """Weight of the expected-L0 penalty added to the task loss."""
    structured: bool = False
    """Add one group gate per parameter tensor (structured diff pruning)."""
    group_penalty: str = "per_gate"
    """How structured training penalises a group gate z_g (no effect unless `structured`).

    "per_gate" (default; the paper's public reference code): lambda * (sum_i P(z_i) + P(z_g)),
    every gate counted once, so a group gate closes only when the task loss pushes it.
    "expected_l0" (METHOD.md, the paper's equation): lambda * sum_i P(z_i) P(z_g), the expected L0
    of the diff. The group logit's penalty gradient scales with the tensor's size, so with Adam at
    the paper's alpha lr the gates of large matrices close within ~100 steps, before w has moved:
    on MiniLM-L6 / GLUE it scored 0.0 on CoLA and chance on RTE
    (benchmarks/results/glue_structured_study/expected_l0_lr_5e-4/; why: benchmarks/results/glue_accuracy.md,
    "Why the group gates close").
    """
    use_gates: bool = True
    """False trains a dense diff with no gates or penalty (the non-adaptive magnitude baseline)."""
    stretch_l: float = -1.5
    stretch_r: float = 1.5
    alpha_init: float = 5.0
    diff_parameters: list[str] | None = None
    """Patterns of parameters to diff; None diffs every parameter that is not head or frozen."""
    head_parameters: list[str] = field(default_factory=lambda: list(DEFAULT_HEAD_PATTERNS))
    """Patterns of parameters trained densely and stored whole (the new task head)."""
    frozen_parameters: list[str] = field(default_factory=list)
    """Patterns of parameters neither diffed nor trained."""
    alpha_dtype: str = "fp32"
    """Storage of the gate logits alpha (and so of their AdamW moments): "fp32" or "bf16" (half the
    bytes; the gate arithmetic still runs in float32, and `diffprune.optim.AdamW` steps bf16 logits in
    float32 and rounds them back stochastically, so small updates are not lost)."""
    w_dtype: str = "fp32"
    """Storage of the L0 stage's diff values w (and so of their AdamW moments): "fp32" or "bf16" (the gate
    arithmetic runs in float32 either way; `diffprune.optim.AdamW` rounds bf16 updates stochastically)."""
    candidates: float | None = None
    """Candidate-restricted L0: the fraction c of diffed entries (chosen by an importance warm-up,
    `diffprune.candidates`) that get w and alpha; None = every entry (the paper's dense L0 stage)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        t = self.target_sparsity
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (0.0 < t <= 1.0) or math.isnan(t):
            raise ConfigError(
                f"target_sparsity={t!r} is outside (0, 1]: it is the fraction of diffed entries kept, "
                "e.g. 0.005 for 0.5%"
            )
        if self.group_penalty not in GROUP_PENALTIES:
            raise ConfigError(
                f"group_penalty={self.group_penalty!r} is not one of {', '.join(GROUP_PENALTIES)} "
                "(expected_l0: the paper's expected L0; per_gate: each gate counted once, as its reference code)"
            )
        if self.alpha_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"alpha_dtype={self.alpha_dtype!r} is not one of fp32, bf16")
        if self.w_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"w_dtype={self.w_dtype!r} is not one of fp32, bf16")
        c = self.candidates
        if c is not None:
            if not isinstance(c, (int, float)) or isinstance(c, bool) or math.isnan(c) or not (0.0 < c < 1.0):
                raise ConfigError(
                    f"candidates={c!r} must be a fraction in (0, 1), e.g. 0.05 for 5% of the entries; "
                    "leave it unset (None) for the dense L0 stage over every entry"
                )
            if c < t:
                raise ConfigError(
                    f"candidates={c:g} is below target_sparsity={t:g}: projection keeps round(t * n) entries, so "
                    f"there must be at least as many candidates; raise --candidates (e.g. {min(0.5, 10 * t):g})"
                )
            if not self.use_gates:
                raise ConfigError("candidates need the L0 gates (use_gates=True): magnitude pruning has no L0 stage")
        if not (self.l0_lambda >= 0.0):
            raise ConfigError(f"l0_lambda={self.l0_lambda!r} must be >= 0")
        if not (self.stretch_l < 0.0 and self.stretch_r > 1.0):
            raise ConfigError(
                f"stretch interval ({self.stretch_l}, {self.stretch_r}) must satisfy l < 0 < 1 < r so that "
                "gates can be exactly 0 and exactly 1 (the paper uses -1.5, 1.5)"
            )
        for name in ("diff_parameters", "head_parameters", "frozen_parameters"):
            patterns = getattr(self, name)
            if patterns is not None:
                check_patterns(name, patterns)

    # ---- parameter selection -------------------------------------------------------------
    @staticmethod
    def _matches(name: str, patterns) -> bool:
        return any(re.search(rf"(?:^|\.)(?:{pattern_regex(p)})(?:\.|$)", name) for p in patterns or ())

    def role_of(self, name: str) -> str:
        """'head', 'frozen', 'diff' or 'untouched' for a parameter name."""
        if self._matches(name, self.head_parameters):
            return "head"
        if self._matches(name, self.frozen_parameters):
            return "frozen"
        if self.diff_parameters is None or self._matches(name, self.diff_parameters):
            return "diff"
        return "frozen"

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiffPruningConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown DiffPruningConfig keys {unknown}; known keys are {sorted(known)} "
                "(was the file written by a newer diffprune?)"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DiffPruningConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"diff config is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError("diff config JSON must be an object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        from ._io import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DiffPruningConfig":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
