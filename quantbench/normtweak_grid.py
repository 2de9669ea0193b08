"""Norm-tweaking's learning-rate grid search (``python -m quantbench.normtweak_grid``): every ``(lr0, scale)`` of
:data:`quantbench.normtweak.LR_GRID` run as an ordinary, recorded benchmark run and scored on held-out data; the
result fills :data:`quantbench.normtweak.LR_TABLE`."""
from __future__ import annotations

import argparse
import tempfile

from tabulate import tabulate

from quantbench.normtweak import LR_GRID
from quantbench.results import ResultStore
from quantbench.runner import RunConfig, run
from quantbench.tasks import make_task


def grid_search(model: str, pipeline: str, scheme: str, calibration: dict, lr0s=LR_GRID["lr0"],
                scales=LR_GRID["scale"], seqlen: int = 512, windows: int = 4, results_dir=None) -> list[dict]:
    """Run ``pipeline`` for every ``(lr0, scale)`` and score it by perplexity on the *held-out* austen validation
    split (never the test split the leaderboard reports); rows sorted best first. Every run is an ordinary
    recorded result (``results_dir``), so the choice can be audited."""
    task = [make_task("ppl-austen", seqlen=seqlen, max_windows=windows, split="validation")]
    store = ResultStore(results_dir or tempfile.mkdtemp(prefix="normtweak-grid-"))
    rows = []
    for lr0 in lr0s:
        for scale in scales:
            cfg = RunConfig(pipeline, model, scheme, calibration=calibration, options={"nt_lr": lr0, "nt_scale": scale})
            rec = run(cfg, task, store).records[0]
            rows.append({"lr0": lr0, "scale": scale, "ppl": rec["value"], "protocol": rec["protocol"],
                         "config": rec["config_hash"]})
    return sorted(rows, key=lambda r: r["ppl"])


def main(argv=None) -> None:
    """``python -m quantbench.normtweak_grid --model smollm2-135m --pipeline gptq+normtweak --scheme w3a16``"""
    p = argparse.ArgumentParser(prog="python -m quantbench.normtweak_grid", description=grid_search.__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pipeline", default="gptq+normtweak")
    p.add_argument("--scheme", default="w3a16")
    p.add_argument("--calib", default="generated")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--calib-seed", type=int, default=1)
    p.add_argument("--lr0", default=",".join(map(str, LR_GRID["lr0"])))
    p.add_argument("--scale", default=",".join(map(str, LR_GRID["scale"])))
    p.add_argument("--results-dir", default=None)
    a = p.parse_args(argv)
    rows = grid_search(a.model, a.pipeline, a.scheme, {"corpus": a.calib, "nsamples": a.nsamples,
                       "seqlen": a.calib_seqlen, "seed": a.calib_seed},
                       [float(x) for x in a.lr0.split(",")], [float(x) for x in a.scale.split(",")],
                       results_dir=a.results_dir)
    print(tabulate(rows, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
