"""What the benchmark scripts share: their common options, the device, CUDA sync and the JSON file.

The scripts import it from beside themselves (they run as `python benchmarks/<name>.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the script's docstring's first paragraph, with --device, --threads,
    --seed and --json."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); torch's default if unset"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write all results as JSON here")
    return p


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path: Path, result: dict) -> None:
    """The results as indented JSON (values JSON cannot hold written as strings), parents made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
