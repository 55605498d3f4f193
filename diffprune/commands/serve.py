"""`diffprune serve RUN_DIR [RUN_DIR ...]`: serve many tasks from one base model over HTTP."""

from __future__ import annotations

import argparse
import ipaddress
import sys

DESCRIPTION = """\
Serve the tasks of several run directories (written by `diffprune train`) from one base model:
each task is a sparse diff plus a head, applied on demand. Requests for the same task that arrive
together are batched. OpenAPI page at http://HOST:PORT/docs.

  GET  /health                     status
  GET  /v1/tasks                   tasks: labels, nnz, stored bytes, validation metrics
  POST /v1/tasks/{task}/predict    {"inputs": ["text", ...]} or {"inputs": [["a", "b"], ...]}
  POST /v1/tasks                   {"run_dir": "DIR under --diff-root", "name": "optional"}
  DELETE /v1/tasks/{task}
  GET  /v1/stats                   batching, switching and memory counters
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
                   help="base checkpoint (path or hub id); default: the one named in the first diff")
    p.add_argument("--diff-root", default=None,
                   help="directory under which POST /v1/tasks may load run directories (default: adding disabled)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most inputs per forward (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="longest a request waits for others of the same task to join its batch (default 5)")
    p.add_argument("--max-inputs", type=int, default=64, help="most inputs per request; more -> 413 (default 64)")
    p.add_argument("--max-text-chars", type=int, default=20_000, help="longest text in characters; longer -> 413")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; larger -> 413 (1 MiB)")
    p.add_argument("--max-queue", type=int, default=4096, help="most queued inputs; beyond it -> 503")
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

    from ..cli import UsageError
    from ..diff_file import SparseDiff
    from ..serving.multitask import MultiTaskModel, default_task_name
    from ..serving.server import ServerSettings, create_app

    if not args.run_dirs and not args.base_model:
        raise UsageError("give at least one RUN_DIR, or --base-model (with --diff-root to add tasks later)")
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
        diff_root=args.diff_root,
    )
    settings.validate()
    if args.diff_root:
        from pathlib import Path

        if not Path(args.diff_root).is_dir():
            raise UsageError(f"--diff-root {args.diff_root} is not a directory")

    runs = _parse_runs(args.run_dirs)
    diffs = [(name, path, SparseDiff.load(path)) for name, path in runs]
    base = args.base_model or diffs[0][2].extra.get("base_model")
    if not base:
        raise UsageError(f"{runs[0][1]} does not name its base model (extra['base_model']): pass --base-model")
    names = [name or default_task_name(diff, path) for name, path, diff in diffs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"several run directories are task {dupes[0]!r}: name them with NAME=RUN_DIR")

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"diffprune serve: loading base {base}", file=sys.stderr)
    model = MultiTaskModel(base, allow_base_mismatch=args.allow_base_mismatch)
    for name, (_, path, diff) in zip(names, diffs):
        info = model.add_task(name, diff, run_dir=path)
        print(f"diffprune serve: task {name}: {info['task_type']}, nnz {info['nnz']:,}, from {path}", file=sys.stderr)
    del diffs  # the model keeps what it needs (positions, merged and base values, heads)
    app = create_app(model, settings)

    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    server = uvicorn.Server(config)
    print(f"diffprune serve: {len(model)} task(s) on http://{args.host}:{args.port} (docs at /docs)", file=sys.stderr)
    server.run()
    return 0
