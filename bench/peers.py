"""Peer implementations as leaderboard rows (``tox -e peers``): llm-compressor's RTN, GPTQ, AutoRound and
SmoothQuant W8A8 on SmolLM2-135M, calibrated on the same token windows as our rows, written as compressed-tensors
checkpoints and evaluated through ``quantbench run --method load`` (label ``llm-compressor:<method>``) into the
same results.

    python bench/peers.py --results-dir reports/results --leaderboard reports/leaderboard.md

Settings that differ from our rows of the same name (the leaderboard shows both; docs/export.md spells them out):

- weight grid: theirs ``absmax / 7.5`` on ``[-8, 7]`` (compressed-tensors ``calculate_qparams``; our ``sym_ct``),
  ours ``absmax / 7`` (QuaRot's ``sym``); SmoothQuant's weights: theirs ``[-128, 127]`` / 127.5, ours ``[-127,
  127]`` / 127 (``sym_pm``), activations per token likewise;
- GPTQ order: theirs quantizes every linear of a block from one set of Hessians (not true-sequential) with
  activation ordering (``actorder="static"``), ours true-sequential without reordering; both damp 1 % of the mean
  diagonal, 128-column blocks;
- the ``--matched`` run adds our GPTQ with their grid and order (``--wgrid sym_ct``, ``true_sequential=false``,
  ``act_order=true``) on 8 x 2048 windows beside theirs on the same windows.

Checkpoints go to ``$QUANTBENCH_CACHE/peers`` (never into the working tree).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time

log = logging.getLogger("peers")

W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}  # per channel: 576 is no multiple of 128


def recipes(alpha: float) -> dict:
    from llmcompressor.modifiers.autoround import AutoRoundModifier
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    groups = {"group_0": {"targets": ["Linear"], "weights": W4}}
    return {
        "rtn": ("w4a16", QuantizationModifier(config_groups=groups, ignore=["lm_head"])),
        "gptq": ("w4a16", GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=0.01, block_size=128)),
        # AutoRound (auto-round 0.15.1 through llm-compressor): its default 200 sign-gradient steps per block; no
        # torch.compile on the CPU
        "autoround": ("w4a16", AutoRoundModifier(config_groups=groups, ignore=["lm_head"], iters=200,
                                                 enable_torch_compile=False)),
        "smoothquant": ("w8a8", [SmoothQuantModifier(smoothing_strength=alpha),
                                 QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])]),
    }


def calibrate(name: str, recipe, windows, src: str, out) -> float:
    """One llm-compressor ``oneshot`` on ``windows`` (token ids [n, seqlen]); the checkpoint at ``out``."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    wall = time.perf_counter() - t0
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    log.info("llm-compressor %s: calibrated in %.1fs -> %s", name, wall, out)
    return wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results-dir", default="reports/results")
    ap.add_argument("--leaderboard", default=None)
    ap.add_argument("--methods", default="rtn,gptq,autoround,smoothquant")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--matched", action="store_true", help="also GPTQ at matched grid and order on 8 x 2048")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    from quantbench import models
    from quantbench.cache import cache_dir
    from quantbench.data import Calibration
    from quantbench.methods.smoothquant import alpha_for

    src, _, _ = models._smollm2_dir()
    tok = models._tokenizer(str(src))
    alpha, _ = alpha_for(models.SMOLLM2["id"], -1.0)  # ours: the code default for a model outside its table
    root = cache_dir() / "peers"
    common = ["--tasks", "ppl-austen", "--ppl-windows", str(args.ppl_windows), "--results-dir", args.results_dir,
              *(["--leaderboard", args.leaderboard] if args.leaderboard else [])]
    runs = [(m, args.nsamples, args.calib_seqlen) for m in args.methods.split(",")]
    if args.matched:
        runs.append(("gptq", 8, 2048))
    for method, n, seqlen in runs:
        scheme, recipe = recipes(alpha)[method]  # fresh modifiers: llm-compressor initializes each one once
        windows = Calibration(tok, "austen", n, seqlen, 0).windows
        out = root / f"llm-compressor-{method}-{scheme}-austen{n}x{seqlen}"
        calibrate(method, recipe, windows, str(src), out)
        label = f"llm-compressor:{method} (austen {n}×{seqlen} s0)"  # their rows carry no calibration record
        subprocess.run([sys.executable, "-m", "quantbench.cli", "run", "--method", "load", "--model", str(out),
                        "--scheme", "headline", "--method-opt", f"label={label},base=smollm2-135m", *common],
                       check=True)
    if args.matched:  # ours at their grid and order, same windows
        subprocess.run([sys.executable, "-m", "quantbench.cli", "run", "--method", "gptq", "--model",
                        "smollm2-135m", "--scheme", "w4a16", "--wgrid", "sym_ct", "--method-opt",
                        "true_sequential=false,act_order=true", "--calib", "austen", "--nsamples", "8",
                        "--calib-seqlen", "2048", "--calib-seed", "0", *common], check=True)
        subprocess.run([sys.executable, "-m", "quantbench.cli", "run", "--method", "gptq", "--model",
                        "smollm2-135m", "--scheme", "w4a16", "--calib", "austen", "--nsamples", "8",
                        "--calib-seqlen", "2048", "--calib-seed", "0", *common], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
