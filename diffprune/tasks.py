"""Tasks: the nine GLUE tasks and the user's own data, loaded with `datasets` and validated.

GLUE comes from a local folder laid out as ``<data_dir>/<task>/{train,validation}.tsv`` (tab-separated,
header line, no quoting, Hugging Face ``glue`` column names; MNLI's validation file is
``validation_matched.tsv``) or, without a folder, from the Hugging Face hub (``nyu-mll/glue``).
Custom data is a CSV, TSV or JSON Lines file per split with one or two text columns and a label
column; the task type is given (``task_type``, the CLI's ``--task-type``) or inferred from the training
file's labels (integer ids or names -> classification, non-integer numbers -> regression; a file of mostly
integer ids with a few non-integers is refused as ambiguous), and the choice is recorded with its reason.

Every file is checked before anything is trained: existence, UTF-8, header and columns, row shape
and labels. Problems raise `DataError` with the file, line and column and what to do about it.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

GLUE_HUB_ID = "nyu-mll/glue"
CLASSIFICATION, REGRESSION = "classification", "regression"
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
_MAX_CLASSES = 1000
TASK_TYPES = (CLASSIFICATION, REGRESSION)
AMBIGUOUS_FRACTION = 0.1
"""Inference refuses numeric labels of which fewer than this fraction are non-integers (e.g. 0/1 ids and
one 1.5): a typo in a classification file and a regression target are both plausible."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task's data looks like and how it is scored."""

    name: str
    text_columns: tuple[str, ...]
    label_column: str = "label"
    task_type: str = CLASSIFICATION
    labels: tuple[str, ...] = ()
    """Label names, index = class id ([] for regression)."""
    metrics: tuple[str, ...] = ("accuracy",)
    """The metrics reported (keys of `diffprune.metrics.compute_metrics`)."""
    score_metrics: tuple[str, ...] = ("accuracy",)
    """The metrics averaged (x100) into the task's single score."""
    validation_split: str = "validation"
    glue: bool = False
    """GLUE files hold class ids (0, 1, ...) as labels; label names are accepted too."""

    @property
    def num_labels(self) -> int:
        return 1 if self.task_type == REGRESSION else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.task_type == REGRESSION


def _glue(name, text_columns, labels=(), metrics=("accuracy",), score_metrics=None, regression=False, split="validation"):
    return TaskSpec(
        name=name, text_columns=tuple(text_columns), task_type=REGRESSION if regression else CLASSIFICATION,
        labels=tuple(labels), metrics=tuple(metrics), score_metrics=tuple(score_metrics or metrics),
        validation_split=split, glue=True,
    )


# Column and label names as in the Hugging Face `glue` data set.
GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", ["sentence"], ["unacceptable", "acceptable"], ["matthews_correlation"]),
    "sst2": _glue("sst2", ["sentence"], ["negative", "positive"]),
    "mrpc": _glue("mrpc", ["sentence1", "sentence2"], ["not_equivalent", "equivalent"], ["accuracy", "f1"]),
    "qqp": _glue("qqp", ["question1", "question2"], ["not_duplicate", "duplicate"], ["accuracy", "f1"]),
    "stsb": _glue("stsb", ["sentence1", "sentence2"], metrics=["pearson", "spearmanr"], regression=True),
    "mnli": _glue("mnli", ["premise", "hypothesis"], ["entailment", "neutral", "contradiction"],
                  split="validation_matched"),
    "qnli": _glue("qnli", ["question", "sentence"], ["entailment", "not_entailment"]),
    "rte": _glue("rte", ["sentence1", "sentence2"], ["entailment", "not_entailment"]),
    "wnli": _glue("wnli", ["sentence1", "sentence2"], ["not_entailment", "entailment"]),
}


def glue_task(name: str) -> TaskSpec:
    spec = GLUE_TASKS.get(str(name).lower())
    if spec is None:
        raise DataError(
            f"unknown task {name!r}: the GLUE tasks are {', '.join(GLUE_TASKS)}; for your own data leave out --task "
            "and pass --train-file, --validation-file, --text-columns and --label-column"
        )
    return spec


def custom_spec(name: str, text_columns, label_column: str, task_type: str, labels=()) -> TaskSpec:
    """The spec of user data: accuracy (+ macro F1) for classification, Pearson/Spearman for regression."""
    if task_type == REGRESSION:
        return TaskSpec(name, tuple(text_columns), label_column, REGRESSION, (), ("pearson", "spearmanr"), ("pearson",))
    metrics = ("accuracy", "f1") if len(labels) == 2 else ("accuracy", "macro_f1")
    return TaskSpec(name, tuple(text_columns), label_column, CLASSIFICATION, tuple(labels), metrics, ("accuracy",))


@dataclass
class TaskData:
    """A task's spec and its encoded splits: datasets with the text columns and ``labels``."""

    spec: TaskSpec
    train: Any  # datasets.Dataset
    validation: Any
    source: dict = field(default_factory=dict)
    """Where the data came from (recorded in the run so `diffprune eval` can find it again)."""


# ---- file scanning ----------------------------------------------------------------------------
def file_format(path: str | Path) -> str:
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown file type {Path(path).suffix or '(no extension)'!r}; use a .csv, .tsv or .jsonl file"
        )
    return fmt


def _where(path, line=None, column=None) -> str:
    out = str(path)
    if line is not None:
        out += f", line {line}"
    if column is not None:
        out += f", column {column!r}"
    return out


def _decoded_lines(path: Path):
    """(line number, text) for each line, checking UTF-8 as it goes (BOM dropped, newline stripped)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{_where(path, n)}: byte {e.start + 1} (0x{raw[e.start]:02x}) is not valid UTF-8; "
                    "save the file as UTF-8"
                ) from None
            if n == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield n, text.rstrip("\r\n")


@dataclass
class _Scan:
    columns: list[str]
    lines: list[int]
    """The line number of each data row, in order."""
    labels: list | None = None
    """Raw label values (JSON Lines only; CSV/TSV labels come from the loaded dataset)."""


def _check_path(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise DataError(f"{what} {path} is a directory; give a .csv, .tsv or .jsonl file")
    if path.stat().st_size == 0:
        raise DataError(f"{what} {path} is empty; it needs a header line and at least one example")


def _need_columns(path, header: list[str], needed: list[str], hint: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} (its columns are {', '.join(map(repr, header))}); {hint}"
        )


def _scan_delimited(path: Path, fmt: str, needed: list[str], hint: str) -> _Scan:
    header, lines = None, []
    if fmt == "tsv":  # no quoting: a field is everything between tabs
        for n, text in _decoded_lines(path):
            if header is None:
                header = text.split("\t")
                continue
            if not text.strip():
                continue
            k = text.count("\t") + 1
            if k != len(header):
                raise DataError(
                    f"{_where(path, n)}: {k} tab-separated fields but the header has {len(header)}; "
                    "fix that line (TSV fields may not contain tabs or newlines)"
                )
            lines.append(n)
    else:
        decoded = (text + "\n" for _, text in _decoded_lines(path))
        reader = csv.reader(decoded)
        start = 1
        try:
            for row in reader:
                if header is None:
                    header = row
                    start = reader.line_num + 1
                    continue
                if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                    start = reader.line_num + 1
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{_where(path, start)}: {len(row)} comma-separated fields but the header has {len(header)}; "
                        "quote fields that contain commas"
                    )
                lines.append(start)
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{_where(path, reader.line_num)}: {e}; fix the CSV quoting") from None
    if header is None:
        raise DataError(f"{path} is empty; it needs a header line and at least one example")
    header = [h.strip() for h in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{_where(path, 1)}: the header names column {dupes[0]!r} twice; rename one")
    _need_columns(path, header, needed, hint)
    if not lines:
        raise DataError(f"{path} has a header but no examples; add rows below the header")
    return _Scan(header, lines)


def json_objects(path: Path):
    """(line number, object) for each non-blank line of a JSON Lines file; a line that is not a JSON
    object is a `DataError` naming it."""
    for n, text in _decoded_lines(path):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{_where(path, n)}: not valid JSON ({e.msg} at character {e.colno}); fix that line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{_where(path, n)}: expected a JSON object per line, got {type(obj).__name__}")
        yield n, obj


def _scan_jsonl(path: Path, text_columns: list[str], label_column: str | None, hint: str) -> _Scan:
    lines, labels, keys = [], [], None
    label_kind = None
    for n, obj in json_objects(path):
        if keys is None:
            keys = list(obj)
        for col in text_columns + ([label_column] if label_column else []):
            if col not in obj:
                if not lines:
                    _need_columns(path, list(obj), [col], hint)
                raise DataError(f"{_where(path, n, col)}: the field is missing; every line needs it")
        for col in text_columns:
            if not isinstance(obj[col], str):
                raise DataError(
                    f"{_where(path, n, col)}: text must be a string, got {json.dumps(obj[col])}; fix that line"
                )
        if label_column:
            value = obj[label_column]
            kind = "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else "string"
            if value is None or isinstance(value, (bool, list, dict)):
                raise DataError(
                    f"{_where(path, n, label_column)}: label {json.dumps(value)} is not a number or a string; "
                    "fix that line"
                )
            if label_kind is None:
                label_kind = kind
            elif kind != label_kind:
                raise DataError(
                    f"{_where(path, n, label_column)}: label {json.dumps(value)} is a {kind} but the labels above "
                    f"are {label_kind}s; use one type for every label"
                )
            labels.append(value)
        lines.append(n)
    if not lines:
        raise DataError(f"{path} has no examples (only blank lines); add one JSON object per line")
    return _Scan(keys or [], lines, labels if label_column else None)


def _load_dataset(path: Path, fmt: str, columns: list[str]):
    """The file as a `datasets.Dataset` (CSV/TSV: every column a string, no NA conversion)."""
    import datasets
    from datasets import Features, Value, load_dataset

    was = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        if fmt == "jsonl":
            return load_dataset("json", data_files=str(path), split="train")
        kwargs = dict(
            features=Features({c: Value("string") for c in columns}), keep_default_na=False, na_filter=False,
            encoding="utf-8-sig",
        )
        if fmt == "tsv":
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)
        return load_dataset("csv", data_files=str(path), split="train", **kwargs)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser error becomes a one-line message
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: could not be read as {fmt.upper()} ({msg}); check the file") from e
    finally:
        if was:
            datasets.utils.logging.enable_progress_bar()


def read_file(path, text_columns, label_column: str | None, what: str = "file", hint: str | None = None):
    """(dataset with the text columns [and the raw label column], line numbers, raw labels) of a data file."""
    path = Path(path)
    _check_path(path, what)
    fmt = file_format(path)
    text_columns = list(text_columns)
    hint = hint or "pass --text-columns and --label-column naming columns of this file"
    needed = text_columns + ([label_column] if label_column else [])
    if fmt == "jsonl":
        scan = _scan_jsonl(path, text_columns, label_column, hint)
    else:
        scan = _scan_delimited(path, fmt, needed, hint)
    ds = _load_dataset(path, fmt, scan.columns)
    if len(ds) != len(scan.lines):
        raise DataError(
            f"{path}: read {len(ds)} rows but counted {len(scan.lines)} examples; check the file's quoting"
        )
    ds = ds.select_columns(needed)
    raw_labels = None
    if label_column:
        raw_labels = scan.labels if scan.labels is not None else ds[label_column]
        ds = ds.remove_columns([label_column])
    return ds, scan.lines, raw_labels


# ---- labels -----------------------------------------------------------------------------------
_INT_RE = re.compile(r"^[+-]?\d+$")


def _as_number(value):
    """int or float from a JSON number or a numeric string; None if it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    s = str(value).strip()
    if _INT_RE.match(s):
        return int(s)
    try:
        return float(s)
    except ValueError:
        return None


def _is_float_label(value) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, str):
        s = value.strip()
        return not _INT_RE.match(s) and _as_number(s) is not None
    return False


def _label_name(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_integer_valued(value) -> bool:
    x = _as_number(value)
    return x is not None and math.isfinite(float(x)) and float(x).is_integer()


def _class_names(raw, lines, path, column) -> list[str]:
    names = sorted({_label_name(v) for v in raw})
    if all(_INT_RE.match(n) for n in names):
        names = sorted(names, key=int)
    if "" in names:
        i = next(i for i, v in enumerate(raw) if _label_name(v) == "")
        raise DataError(f"{_where(path, lines[i], column)}: the label is empty; fill it in or remove the row")
    if len(names) < 2:
        raise DataError(
            f"{path}, column {column!r}: every example has the label {names[0]!r}; classification needs at least "
            "two different labels"
        )
    if len(names) > _MAX_CLASSES:
        raise DataError(
            f"{path}, column {column!r}: {len(names)} different labels; is {column!r} really the label column? "
            "(use --label-column, or --task-type regression for numeric targets)"
        )
    return names


def _shown(names, n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def infer_labels(raw, lines, path, column, task_type: str | None = None) -> tuple[str, list[str], str]:
    """(task_type, label names, why) from a training file's labels, or checked against `task_type`.

    Inferred: labels that are all integers or names are classes; numeric labels with non-integers are a
    regression target, unless fewer than `AMBIGUOUS_FRACTION` of them are non-integers: such a file (0/1
    class ids and a stray 1.5) is refused, naming the lines, until `task_type` decides."""
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"--task-type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if task_type == REGRESSION:
        return REGRESSION, [], "given (--task-type regression)"
    if task_type == CLASSIFICATION:
        names = _class_names(raw, lines, path, column)
        return CLASSIFICATION, names, f"given (--task-type classification); {len(names)} labels: {_shown(names)}"
    floats = [i for i, v in enumerate(raw) if _is_float_label(v)]
    if not floats:
        names = _class_names(raw, lines, path, column)
        kind = "integer class ids" if all(_INT_RE.match(n) for n in names) else "names"
        return CLASSIFICATION, names, f"inferred: the labels are {len(names)} {kind} ({_shown(names)})"
    numeric = [v for v in raw if _as_number(v) is not None]
    if len(numeric) == len(raw):
        fractional = [i for i in floats if not _is_integer_valued(raw[i])]
        if not fractional:
            raise DataError(
                f"{path}, column {column!r}: every label is a whole number but some are written as decimals "
                f"({_label_name(raw[floats[0]]) if not isinstance(raw[floats[0]], float) else raw[floats[0]]} on line "
                f"{lines[floats[0]]}): class ids or a numeric target? Pass --task-type classification or "
                "--task-type regression"
            )
        if len(fractional) < AMBIGUOUS_FRACTION * len(raw):
            where = ", ".join(str(lines[i]) for i in fractional[:5]) + (" ..." if len(fractional) > 5 else "")
            shown = ", ".join(_label_name(raw[i]) for i in fractional[:3])
            raise DataError(
                f"{path}, column {column!r}: the labels are integer class ids except {len(fractional)} of "
                f"{len(raw)} ({shown} on line(s) {where}); is this classification with a typo, or regression? "
                "Fix those lines, or pass --task-type classification or --task-type regression"
            )
        return REGRESSION, [], (f"inferred: {len(fractional)} of {len(raw)} labels are non-integer numbers "
                                f"(e.g. {_label_name(raw[fractional[0]])}); --task-type classification to override")
    i = next(i for i, v in enumerate(raw) if _as_number(v) is None)
    j = floats[0]
    raise DataError(
        f"{_where(path, lines[i], column)}: label {_label_name(raw[i])!r} is not a number, but other labels are "
        f"non-integer numbers as in a regression task ({_label_name(raw[j])} on line {lines[j]}); fix that row, or "
        "pass --task-type classification to treat every label as a class name"
    )


def encode_labels(raw, lines, spec: TaskSpec, path) -> list:
    """Class ids (or floats for regression) for raw labels, with a precise error for the first bad one."""
    column = spec.label_column
    out = []
    if spec.is_regression:
        for v, n in zip(raw, lines):
            x = _as_number(v)
            if x is None or not math.isfinite(float(x)):
                shown = json.dumps(v) if not isinstance(v, str) else repr(v)
                raise DataError(
                    f"{_where(path, n, column)}: label {shown} is not a number, but {spec.name} is a regression "
                    "task (numeric labels such as 3.8); fix or remove that row"
                )
            out.append(float(x))
        return out
    index = {name: i for i, name in enumerate(spec.labels)}
    for v, n in zip(raw, lines):
        name = _label_name(v)
        i = index.get(name)
        if i is None and spec.glue and _INT_RE.match(name) and 0 <= int(name) < len(spec.labels):
            i = int(name)
        if i is None:
            if spec.glue:
                what = f"is not a label of task {spec.name} (expected class ids 0-{len(spec.labels) - 1} or names " \
                       f"{', '.join(spec.labels)})"
            else:
                what = f"is not a label of the training data ({', '.join(map(repr, spec.labels))})"
            raise DataError(f"{_where(path, n, column)}: label {name!r} {what}; fix or remove that row")
        out.append(i)
    return out


def load_split(path, spec: TaskSpec, what: str = "file", with_labels: bool = True, hint: str | None = None):
    """A file of `spec`'s task as a dataset with its text columns and ``labels``."""
    ds, lines, raw = read_file(path, spec.text_columns, spec.label_column if with_labels else None, what, hint)
    if with_labels:
        ds = ds.add_column("labels", encode_labels(raw, lines, spec, path))
    return ds


def read_texts(path, text_columns) -> list[list[str]]:
    """Rows of text (one or two strings each) from a CSV/TSV/JSONL file, for prediction."""
    ds, _, _ = read_file(path, text_columns, None, "--file", "pass --text-columns naming columns of this file")
    cols = [ds[c] for c in text_columns]
    return [list(row) for row in zip(*cols)]


# ---- whole tasks ---------------------------------------------------------------------------------
def _subset(ds, n: int | None):
    return ds if n is None or n >= len(ds) else ds.select(range(n))


def _check_text_columns(text_columns) -> list[str]:
    cols = [c for c in (text_columns or []) if c]
    if not 1 <= len(cols) <= 2:
        raise DataError(
            f"--text-columns needs one or two column names (a sentence, or a sentence pair), got {len(cols)}"
        )
    if len(set(cols)) != len(cols):
        raise DataError(f"--text-columns names {cols[0]!r} twice")
    return cols


def load_task(
    task: str | None = None,
    data_dir: str | Path | None = None,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    text_columns=None,
    label_column: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    custom_name: str = "custom",
    task_type: str | None = None,
) -> TaskData:
    """Load and validate a task's train and validation splits.

    * ``task`` alone: GLUE from ``data_dir`` if given, else from the Hugging Face hub.
    * ``train_file`` + ``validation_file`` (+ ``text_columns``, ``label_column``): your own data; with a GLUE
      ``task`` its columns, labels and metrics apply, otherwise the labels are inferred from the training file.
    * ``task_type`` (classification / regression) decides the task type of your own data instead of inferring
      it; with a GLUE task it must be that task's.

    ``TaskData.source["task_type_from"]`` says how the task type was decided.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise DataError(f"--task-type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    if task is not None and task_type is not None and task in GLUE_TASKS and GLUE_TASKS[task].task_type != task_type:
        raise DataError(
            f"--task-type {task_type} contradicts GLUE {task}, a {GLUE_TASKS[task].task_type} task; leave out --task-type"
        )
    if train_file is None and validation_file is not None:
        raise DataError("--validation-file needs --train-file too")
    if train_file is not None:
        data = _load_custom(task, data_dir, train_file, validation_file, text_columns, label_column,
                            max_train_samples, max_eval_samples, custom_name, task_type)
        return data
    if task is None:
        raise DataError(
            f"no task: pass --task (one of {', '.join(GLUE_TASKS)}) or your own data with --train-file and "
            "--validation-file"
        )
    spec = glue_task(task)
    if text_columns or label_column:
        spec = _override_columns(spec, text_columns, label_column)
    if data_dir is not None:
        data = _load_glue_dir(spec, Path(data_dir), max_train_samples, max_eval_samples)
    else:
        data = _load_glue_hub(spec, max_train_samples, max_eval_samples)
    data.source.update(task_type=spec.task_type, task_type_from=f"the GLUE {spec.name} task")
    return data


def _override_columns(spec: TaskSpec, text_columns, label_column) -> TaskSpec:
    from dataclasses import replace

    cols = _check_text_columns(text_columns) if text_columns else list(spec.text_columns)
    if len(cols) != len(spec.text_columns):
        raise DataError(
            f"task {spec.name} takes {len(spec.text_columns)} text column(s) ({', '.join(spec.text_columns)}), "
            f"got --text-columns {' '.join(cols)}"
        )
    return replace(spec, text_columns=tuple(cols), label_column=label_column or spec.label_column)


def _glue_file(task_dir: Path, split: str) -> Path:
    for name in dict.fromkeys([split, "validation"] if split.startswith("validation") else [split]):
        for ext in (".tsv", ".csv", ".jsonl"):
            path = task_dir / f"{name}{ext}"
            if path.exists():
                return path
    return task_dir / f"{split}.tsv"


def _load_glue_dir(spec: TaskSpec, data_dir: Path, max_train, max_eval) -> TaskData:
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is not a directory; point it at the folder holding <task>/train.tsv")
    task_dir = data_dir / spec.name
    if not task_dir.is_dir():
        present = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
        raise DataError(
            f"--data-dir {data_dir} has no {spec.name}/ folder (it has: {', '.join(present) or 'nothing'}); "
            f"leave out --data-dir to download {spec.name} from the Hugging Face hub"
        )
    hint = f"the {spec.name} files need the Hugging Face glue columns {', '.join(spec.text_columns + (spec.label_column,))}"
    train_path = _glue_file(task_dir, "train")
    val_path = _glue_file(task_dir, spec.validation_split)
    train = _subset(load_split(train_path, spec, "training file", hint=hint), max_train)
    val = _subset(load_split(val_path, spec, "validation file", hint=hint), max_eval)
    return TaskData(spec, train, val, {"data_dir": str(data_dir.resolve()), "train_file": str(train_path.resolve()),
                                       "validation_file": str(val_path.resolve())})


def _load_glue_hub(spec: TaskSpec, max_train, max_eval) -> TaskData:
    from datasets import load_dataset

    try:
        splits = load_dataset(GLUE_HUB_ID, spec.name)
    except Exception as e:  # noqa: BLE001 - network / cache errors
        raise DataError(
            f"could not load GLUE {spec.name} from the Hugging Face hub ({GLUE_HUB_ID}): {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; "
            "pass --data-dir with a local copy (<dir>/<task>/train.tsv, validation.tsv)"
        ) from e
    out = []
    for split, limit in (("train", max_train), (spec.validation_split, max_eval)):
        ds = splits[split]
        ds = ds.select_columns(list(spec.text_columns) + [spec.label_column])
        ds = _subset(ds, limit)
        raw = ds[spec.label_column]
        where = f"{GLUE_HUB_ID}/{spec.name} {split}"
        labels = encode_labels(raw, [i + 1 for i in range(len(raw))], spec, where)
        out.append(ds.remove_columns([spec.label_column]).add_column("labels", labels))
    return TaskData(spec, out[0], out[1], {"hub": GLUE_HUB_ID})


def _load_custom(task, data_dir, train_file, validation_file, text_columns, label_column, max_train, max_eval,
                 custom_name, task_type=None) -> TaskData:
    if data_dir is not None:
        raise DataError("--data-dir is for GLUE tasks; with --train-file leave it out")
    if validation_file is None:
        raise DataError("--train-file needs --validation-file too (a held-out file to score the model on)")
    if task is not None:  # a GLUE task on the user's own files
        spec = glue_task(task)
        if text_columns or label_column:
            spec = _override_columns(spec, text_columns, label_column)
        train = _subset(load_split(train_file, spec, "training file"), max_train)
        val = _subset(load_split(validation_file, spec, "validation file"), max_eval)
        why = f"the GLUE {spec.name} task"
    else:
        if not text_columns:
            raise DataError("--train-file needs --text-columns (one or two columns holding the text)")
        cols = _check_text_columns(text_columns)
        label_column = label_column or "label"
        if label_column in cols:
            raise DataError(f"--label-column {label_column!r} is also a text column")
        ds, lines, raw = read_file(train_file, cols, label_column, "training file")
        task_type, labels, why = infer_labels(raw, lines, Path(train_file), label_column, task_type)
        spec = custom_spec(custom_name, cols, label_column, task_type, labels)
        train = _subset(ds.add_column("labels", encode_labels(raw, lines, spec, train_file)), max_train)
        val = _subset(load_split(validation_file, spec, "validation file"), max_eval)
    source = {"train_file": str(Path(train_file).resolve()), "validation_file": str(Path(validation_file).resolve())}
    return TaskData(spec, train, val, {**source, "task_type": spec.task_type, "task_type_from": why})


def spec_from_info(info: dict, label_column: str | None = None, text_columns=None) -> TaskSpec:
    """The TaskSpec of a trained run (its metadata), optionally reading other columns."""
    name = info.get("task") or "custom"
    if name in GLUE_TASKS and info.get("glue", True) and list(GLUE_TASKS[name].labels) == list(info.get("labels") or []):
        spec = GLUE_TASKS[name]
    else:
        spec = custom_spec(name, info.get("text_columns") or ["text"], info.get("label_column") or "label",
                           info.get("task_type") or CLASSIFICATION, info.get("labels") or [])
    from dataclasses import replace

    spec = replace(spec, text_columns=tuple(info.get("text_columns") or spec.text_columns),
                   label_column=info.get("label_column") or spec.label_column)
    if text_columns or label_column:
        spec = _override_columns(spec, text_columns, label_column)
    return spec


def load_validation(spec: TaskSpec, data_dir: str | Path | None = None, max_samples: int | None = None):
    """The validation split of a GLUE task (from `data_dir`, else the hub) as an encoded-labels dataset."""
    if data_dir is None:
        return _load_glue_hub(spec, 1, max_samples).validation
    data_dir = Path(data_dir)
    task_dir = data_dir / spec.name
    if not task_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} has no {spec.name}/ folder; point it at the folder holding <task>/")
    return _subset(load_split(_glue_file(task_dir, spec.validation_split), spec, "validation file"), max_samples)
