"""GPU speed tables (bench/test_kernel_speed.py, bench/test_layer_speed.py) -> ``reports/<kind>-<device>.md``."""
from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch
from tabulate import tabulate

from quantbench.results import versions


def write_table(kind: str, title: str, how: str, rows: list[dict]) -> Path:
    """The table with the device, library versions and date in its head (rewritten whole, so a run cut short still
    leaves the rows it measured)."""
    dev = torch.cuda.get_device_name()
    v = versions()
    head = (f"# {title} on {dev}\n\n{datetime.date.today()}, torch {v['torch']}, triton {v['triton']}, quantbench "
            f"{v['quantbench']}, python {platform.python_version()}. {how}\n\n")
    path = Path(__file__).resolve().parent / f"{kind}-{dev.replace(' ', '-')}.md"
    path.write_text(head + tabulate(rows, headers="keys", tablefmt="github") + "\n")
    return path


def read_tables(kind: str, where: Path | None = None) -> dict[str, list[dict]]:
    """``{device: rows}`` from the committed ``<kind>-<device>.md`` tables (the format :func:`write_table` writes;
    numbers parsed, everything else kept as text)."""
    out = {}
    for path in sorted((where or Path(__file__).resolve().parent).glob(f"{kind}-*.md")):
        lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
        if len(lines) < 3:
            continue
        cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
        out[path.stem.removeprefix(f"{kind}-").replace("-", " ")] = [
            {k: _num(v) for k, v in zip(cells[0], row)} for row in cells[2:]]
    return out


def _num(v: str):
    try:
        return float(v)
    except ValueError:
        return v
