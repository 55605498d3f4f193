"""`diffprune serve RUN_DIR [RUN_DIR ...]`: serve many tasks from one base model (per model family) over HTTP.

Classifier runs share one ``AutoModelForSequenceClassification`` base, causal-LM runs one
``AutoModelForCausalLM`` base; when the runs are of both families both bases are loaded and a
`diffprune.serving.router.TaskRouter` sends each request to the base of its task."""

from __future__ import annotations

import argparse
import ipaddress
import sys

DESCRIPTION = """\
Serve the tasks of several run directories (written by `diffprune train`) from one base model:
each task is a sparse diff plus a head, applied on demand. Requests for the same task that arrive
together are batched. Classifier runs and causal-LM runs can be served together: one base is loaded
per model family (the one their diffs name). OpenAPI page at http://HOST:PORT/docs.

  GET  /health                     status
  GET  /v1/tasks                   tasks: labels, nnz, stored bytes, validation metrics
  POST /v1/tasks/{task}/predict    classifier tasks: {"inputs": ["text", ...]} or {"inputs": [["a", "b"], ...]}
  POST /v1/tasks                   {"run_dir": "DIR under --diff-root", "name": "optional"}
  DELETE /v1/tasks/{task}
  GET  /v1/stats                   batching, switching and memory counters
  OpenAI-compatible, for causal-LM (generation) tasks; "model" is the task name:
  GET  /v1/models                  every task ("generation": true marks the generating ones)
  POST /v1/completions             {"model": TASK, "prompt": "...", "max_tokens": 16, "temperature": 0}
  POST /v1/chat/completions        {"model": TASK, "messages": [{"role": "user", "content": "..."}]}
                                   ("stream": true: server-sent events)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_base_mismatch_flag

    p = subparsers.add_parser(
        "serve",
        help="serve many tasks (one base model + sparse diffs) over HTTP",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dirs", nargs="*", metavar="RUN_DIR",
        help="run directory (diff.safetensors + diff_config.json [+ metrics.json]); NAME=RUN_DIR names the task "
        "(default: the diff's task name, else the directory name)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--base-model", default=None,
                   help="base checkpoint (path or hub id); default: the one named in the first diff (of each model "
                   "family: classifier runs and causal-LM runs each get their own base)")
    p.add_argument("--family", default=None, choices=["classifier", "causal-lm"],
                   help="with --base-model: the family it is loaded as (default: the runs' family, else classifier); "
                   "with runs of both families, --base-model replaces this family's base only")
    p.add_argument("--diff-root", default=None,
                   help="directory under which POST /v1/tasks may load run directories (default: adding disabled)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most inputs per forward (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="longest a request waits for others of the same task to join its batch (default 5)")
    p.add_argument("--max-inputs", type=int, default=64, help="most inputs per request; more -> 413 (default 64)")
    p.add_argument("--max-text-chars", type=int, default=20_000, help="longest text in characters; longer -> 413")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; larger -> 413 (1 MiB)")
    p.add_argument("--max-queue", type=int, default=4096, help="most queued inputs; beyond it -> 503")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="most tokens one completion may ask for (max_tokens); more -> 400 (default 512)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_base_mismatch_flag(p)
    p.set_defaults(run=run)
    return p


def _parse_runs(items: list[str]) -> list[tuple[str | None, str]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if sep and name and "/" not in name and path:
            out.append((name, path))
        else:
            out.append((None, item))
    return out


def run(args) -> int:
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ImportError as e:
        print(f"diffprune serve: error: {e.name} is not installed: pip install 'diffprune[serve]'", file=sys.stderr)
        return 2
    import logging

    import torch

    from ..errors import UsageError
    from ..diff_file import SparseDiff
    from ..families import CLASSIFIER
    from ..serving.multitask import MultiTaskModel, default_task_name, diff_family
    from ..serving.router import TaskRouter
    from ..serving.server import ServerSettings, create_app

    if not args.run_dirs and not args.base_model:
        raise UsageError("give at least one RUN_DIR, or --base-model (with --diff-root to add tasks later)")
    if args.family and not args.base_model:
        raise UsageError("--family says how --base-model is loaded: give --base-model too (runs name their own family)")
    if not (0 <= args.port <= 65535):
        raise UsageError(f"--port {args.port} is not a port number")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"diffprune serve: warning: binding to {args.host} exposes the server beyond this machine; "
              "it has no authentication", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ServerSettings(
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_inputs=args.max_inputs,
        max_text_chars=args.max_text_chars, max_body_bytes=args.max_body_bytes, max_queue=args.max_queue,
        diff_root=args.diff_root, max_new_tokens=args.max_new_tokens,
    )
    settings.validate()
    if args.diff_root:
        from pathlib import Path

        if not Path(args.diff_root).is_dir():
            raise UsageError(f"--diff-root {args.diff_root} is not a directory")

    runs = _parse_runs(args.run_dirs)
    diffs = [(name, path, SparseDiff.load(path)) for name, path in runs]
    names = [name or default_task_name(diff, path) for name, path, diff in diffs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"several run directories are task {dupes[0]!r}: name them with NAME=RUN_DIR")
    # one base per family, in the order the families first appear
    families: dict[str, list] = {}
    for name, (_, path, diff) in zip(names, diffs):
        families.setdefault(diff_family(diff), []).append((name, path, diff))
    if not families:
        families[args.family or CLASSIFIER] = []
    override = args.family or next(iter(families))
    if args.family and args.family not in families and diffs:
        raise UsageError(f"--family {args.family}: no RUN_DIR is a {args.family} run (they are {', '.join(families)})")
    if args.base_model and len(families) > 1 and not args.family:
        raise UsageError(f"the runs are of several families ({', '.join(families)}), each on its own base: say which "
                         "one --base-model replaces with --family")
    bases = {}
    for family, group in families.items():
        if args.base_model and family == override:
            base = args.base_model
        else:
            base = group[0][2].extra.get("base_model") if group else None
        if not base:
            raise UsageError(f"{group[0][1]} does not name its base model (extra['base_model']): pass --base-model")
        bases[family] = base

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = []
    for family, base in bases.items():
        print(f"diffprune serve: loading {family} base {base}", file=sys.stderr)
        model = MultiTaskModel(base, family=family, allow_base_mismatch=args.allow_base_mismatch)
        for name, path, diff in families[family]:
            info = model.add_task(name, diff, run_dir=path)
            print(f"diffprune serve: task {name}: {info['task_type']}, nnz {info['nnz']:,}, from {path}", file=sys.stderr)
        models.append(model)
    del diffs, families  # the models keep what they need (positions, merged and base values, heads)
    router = TaskRouter(models)
    app = create_app(router if len(models) > 1 else models[0], settings)

    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    server = uvicorn.Server(config)
    print(f"diffprune serve: {len(router)} task(s) on http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr)
    server.run()
    return 0
