"""Machine, package and command facts that every benchmark result records."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions(*packages: str) -> dict:
    out = {}
    for p in ("diffprune", "torch", "transformers", "accelerate", "datasets", "peft", *packages):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_results(out, text: str, record: dict) -> None:
    """OUT.md (the table people read) and OUT.json (the record), each written atomically."""
    from pathlib import Path

    from diffprune._io import atomic_write_text

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".md"), text)
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
