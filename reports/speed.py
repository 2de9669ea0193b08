"""Speed tables -> ``reports/<kind>-<device>.md``: the GPU kernels and layer (bench/test_kernel_speed.py,
bench/test_layer_speed.py) and the CPU calibrations (bench/test_calibration_speed.py)."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch
from tabulate import tabulate

from quantbench.results import device_info, versions


def cpu_name() -> str:
    """The CPU's model name (``results.device_info``) and its core count, e.g. ``AMD EPYC 2-core``."""
    return f"{device_info('cpu')['name']} {os.cpu_count()}-core"


def write_table(kind: str, title: str, how: str, rows: list[dict], device: str = "cuda") -> Path:
    """The table with the device, library versions and date in its head (rewritten whole, so a run cut short still
    leaves the rows it measured). ``device`` "cpu": named by :func:`cpu_name`, with torch's thread count."""
    dev = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    v = versions()
    threads = f", {torch.get_num_threads()} torch threads" if device == "cpu" else ""
    head = (f"# {title} on {dev}\n\n{datetime.date.today()}, torch {v['torch']}, triton {v['triton']}, quantbench "
            f"{v['quantbench']}, python {platform.python_version()}{threads}. {how}\n\n")
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
