"""The papers' numbers, as facts with their source, and reproduction cards.

:data:`VALUES` holds every number the leaderboards put beside ours: one :class:`PaperValue` per (model, method,
scheme, task, metric), with the paper and table it comes from and the evaluation protocol it was measured under
(in this suite's protocol labels, so a cell is compared only when our record has the same label). Numbers the
reference notes flag as paper-internal inconsistencies are kept out of :data:`VALUES` and listed in
:data:`INCONSISTENT` with the reason, so nobody uses them as targets.

:data:`CARDS` are reproduction cards: per (method, model, scheme), the exact settings the paper's number needs,
including the ones only in scripts or issues, as the ``pytest bench/`` command line that runs them, with the
expected values and a tolerance. ``tests/test_reports.py`` parses every card's command through the bench's own
option validation, so a card cannot drift from what the suite accepts.

Scheme names: the DuQuant/OmniQuant papers' "W4A4" quantizes Q/K/V to 4 bits as well (``w4a4q4kv4``);
QuaRot's main table quantizes K/V but keeps Q in FP16 (``w4a4kv4``).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

WIKI = "ppl/gptq/wikitext2-test/seqlen2048"
C4 = {v: f"ppl/gptq/c4-validation/{v}/seqlen2048" for v in ("duquant-seed20", "omniquant-seed0", "quarot-first1100")}


@dataclass(frozen=True)
class PaperValue:
    source: str  # paper and table
    model: str  # zoo alias
    method: str  # registered method
    scheme: str  # this suite's scheme name
    task: str
    metric: str
    value: float
    protocol: str  # this suite's protocol label of the paper's measurement
    note: str = ""
    grids: tuple = ()  # (tensor, grid) pairs the paper's setting fixes where it differs from the method's default
    setting: str = ""  # what tells apart rows of one table that share a scheme (SmoothQuant's O1/O2/O3)

    @property
    def key(self) -> tuple:
        return self.model, self.method, self.scheme, self.task, self.metric


def _ppl_table(source: str, models: list[str], rows: dict, scheme_of, c4: str, note: str = "",
               grids: tuple = (), c4_of: dict | None = None, note_of: dict | None = None) -> list[PaperValue]:
    """``rows``: method -> one "wikitext2/c4" string (or None) per model; ``scheme_of(method)`` names the scheme;
    ``c4_of``/``note_of``: per-method C4 subset and note where a row's number comes from another paper."""
    out = []
    for method, cells in rows.items():
        proto_c4 = C4[(c4_of or {}).get(method, c4)]
        for model, cell in zip(models, cells):
            if cell is None:
                continue
            for task, proto, text in zip(("ppl-wikitext2", "ppl-c4"), (WIKI, proto_c4), cell.split("/")):
                if text.strip() not in ("", "-"):
                    out.append(PaperValue(source, model, method, scheme_of(method), task, "ppl", float(text),
                                          proto, (note_of or {}).get(method, note), grids))
    return out


def _w4a4(method: str) -> str:
    return "w16a16" if method == "fp16" else "w4a4q4kv4"


_T1_MODELS = ["llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama-2-7b", "llama-2-13b", "llama-2-70b"]
VALUES: list[PaperValue] = [
    *_ppl_table("DuQuant (NeurIPS'24) Table 1", _T1_MODELS, {
        "fp16": ["5.68/7.08", "5.09/6.61", "4.10/5.98", "3.53/5.62", "5.47/6.97", "4.88/6.46", "3.31/5.52"],
        "smoothquant": ["25.25/32.32", "40.05/47.18", "192.40/122.38", "275.53/244.35", "83.12/77.27",
                        "35.88/43.19", "26.01/34.61"],
        "omniquant": ["11.26/14.51", "10.87/13.78", "10.33/12.49", "9.17/11.28", "14.26/18.02", "12.30/14.55",
                      None],  # 2-70B: NaN in the paper (GQA unprocessed)
        "duquant": ["6.40/7.84", "5.65/7.16", "4.72/6.45", "4.13/6.03", "6.28/7.90", "5.42/7.05", "3.79/5.87"],
        "duquant-lwc": ["6.18/7.73", "5.47/7.07", "4.55/6.37", "3.93/5.93", "6.08/7.79", "5.33/7.02", "3.76/5.85"],
    }, _w4a4, "duquant-seed20", "",
        c4_of={"smoothquant": "omniquant-seed0", "omniquant": "omniquant-seed0"},
        note_of={m: "the numbers OmniQuant's paper prints; C4 labelled with its subset (seed 0), assuming DuQuant "
                    "copied them"
                 for m in ("smoothquant", "omniquant")}),
    *_ppl_table("DuQuant (NeurIPS'24) Table D6", ["mistral-7b"], {
        "fp16": ["5.25/7.75"], "rtn": ["306.26/300.07"], "smoothquant": ["100.59/158.02"],
        "omniquant": ["5490.31/6094.82"], "duquant": ["5.86/8.48"],
    }, _w4a4, "duquant-seed20"),
    *_ppl_table("DuQuant (NeurIPS'24) Table 5", ["llama-3-8b"], {
        "fp16": ["6.14/8.88"], "smoothquant": ["210.19/187.93"], "omniquant": ["3640/2800"],
        "duquant": ["8.56/11.98"], "duquant-lwc": ["8.06/11.29"],
    }, _w4a4, "duquant-seed20"),
    *_ppl_table("DuQuant (NeurIPS'24) Table 5 (W6A6)", ["llama-3-8b"], {
        "duquant": ["6.27/8.38"], "duquant-lwc": ["6.27/8.38"],
    }, lambda m: "w6a6q6kv6", "duquant-seed20", "Q/K/V at 6 bits assumed, as in the W4A4 setting"),
    *_ppl_table("DuQuant (NeurIPS'24) Table D8 (W6A6)", _T1_MODELS, {
        "smoothquant": ["6.03/", "5.42/", "4.55/", "3.88/", "6.20/", "5.18/", "3.69/"],
        "omniquant": ["5.96/", "5.28/", "4.38/", "3.75/", "5.87/", "5.14/", "3.71/"],
        "duquant": ["5.73/", "5.13/", "4.14/", "3.57/", "5.53/", "4.92/", "3.35/"],
    }, lambda m: "w6a6q6kv6", "duquant-seed20", "Q/K/V at 6 bits assumed, as in the W4A4 setting"),
    *_ppl_table("DuQuant (NeurIPS'24) Table F22 (QuaRot's setting: symmetric, Q in FP16)",
                ["llama-2-7b", "llama-2-13b"], {
                    "fp16": ["5.47/", "4.88/"], "quarot": ["8.37/", "6.09/"], "quarot-gptq": ["6.10/", "5.40/"],
                }, lambda m: "w16a16" if m == "fp16" else "w4a4kv4", "quarot-first1100",
                "QuaRot-GPTQ 6.10 / 5.40 equal QuaRot's own paper"),
    *_ppl_table("DuQuant (NeurIPS'24) Table 8 / F21 (QuaRot in DuQuant's setting: asymmetric, Q quantized)",
                ["llama-7b", "llama-13b", "llama-30b", "llama-2-7b", "llama-2-13b", "llama-3-8b"], {
                    "quarot": ["7.08/8.73", "6.57/", "5.44/", "9.66/11.98", "6.73/", "13.89/17.59"],
                    "quarot-gptq": ["6.44/7.87", "5.63/", "4.73/", "6.39/8.15", "5.75/", "8.69/12.40"],
                }, _w4a4, "duquant-seed20", "--wgrid asym --agrid asym, unlike QuaRot's default",
                (("w", "asym"), ("a", "asym"))),
    # zero-shot averages (six tasks; DuQuant/OmniQuant harness): paper-only cells for now
    *[PaperValue("DuQuant (NeurIPS'24) Table D1", "llama-2-7b", m, _w4a4(m), "qa6", "avg", v,
                 "lmeval/qa6/duquant-harness", "PIQA, ARC-E, ARC-C, BoolQ, HellaSwag, WinoGrande")
      for m, v in (("fp16", 63.72), ("smoothquant", 44.52), ("omniquant", 51.38), ("duquant", 60.57),
                   ("duquant-lwc", 61.01))],
    *[PaperValue("DuQuant (NeurIPS'24) Table 3", "vicuna-13b", m, _w4a4(m), f"mmlu-{k}shot", "avg", v,
                 f"lmeval/mmlu/{k}shot")
      for m, vals in (("fp16", (54.54, 55.78)), ("smoothquant", (22.82, 25.84)), ("omniquant", (28.12, 29.05)),
                      ("duquant", (50.94, 51.96)), ("duquant-lwc", (51.08, 51.61)))
      for k, v in zip((0, 5), vals)],
    *[PaperValue("DuQuant (NeurIPS'24) Table 4", model, m, _w4a4(m), "longbench-kivi8", "avg", v,
                 "lmeval/longbench/kivi8/max3500", "KIVI's 8-task set")
      for model, vals in (("vicuna-7b", (41.83, 7.56, 3.43, 40.37)), ("vicuna-13b", (42.45, 3.83, 4.77, 40.32)))
      for m, v in zip(("fp16", "smoothquant", "omniquant", "duquant"), vals)],
    # OPT: GPTQ's own opt.py (asymmetric min/max grid, every linear of a block from one pass); the README's OPT-66B
    # "outlier model" numbers before act-order (with --act-order: 9.34 at 4 bits, 9.95 at 3 bits)
    *[PaperValue("GPTQ (ICLR'23) repository README (IST-DASLab/gptq)", "opt-66b", "gptq", s, "ppl-wikitext2", "ppl",
                 v, WIKI, "opt.py defaults: no act-order, no true-sequential", (("w", "asym"),))
      for s, v in (("w4a16", 9.55), ("w3a16", 14.16))],
]

# OmniQuant (ICLR'24) appendix, OPT: Table A20 (WikiText2) and A22 (C4), weight-only (asymmetric min/max grid, the
# OPT scripts run LET as well: ``--method-opt let=on``); Table A25, weight-activation (Q/K/V at the activation bits:
# main.py sets q/k/v_quant_params to ``abits`` and int_opt_layer.py quantizes them in its QuantMatMuls). The cells
# were transcribed from a text rendering of the paper; RPTQ's rows and the PTB columns have no counterpart here.
_OPT = ["opt-125m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"]
_OQ_OPT_WEIGHT_ONLY = {  # scheme -> (WikiText2 row, C4 row), one value per _OPT model
    "w16a16": ("27.65 14.63 12.47 10.86 10.12 9.56 9.34", "24.60 14.72 13.16 11.74 11.19 10.69 10.28"),
    "w2a16g128": ("75.43 23.95 18.13 14.43 12.94 11.39 30.84", "80.10 27.33 21.11 16.67 14.92 13.12 73.83"),
    "w2a16g64": ("62.56 21.40 16.76 13.57 12.33 11.00 10.59", "64.01 23.71 19.16 15.44 14.16 12.80 12.13"),
    "w3a16": ("35.66 16.68 13.80 11.65 10.87 10.00 9.83", "32.17 17.10 14.93 12.78 12.13 11.37 10.82"),
    "w3a16g128": ("32.25 15.72 13.18 11.27 10.47 9.79 9.53", "29.34 16.11 14.15 12.31 11.63 10.98 10.51"),
    "w4a16": ("29.45 15.04 12.76 11.03 10.30 9.65 9.65", "26.36 15.28 13.58 11.97 11.41 10.80 10.63"),
    "w4a16g128": ("28.86 14.88 12.65 10.96 10.20 9.62 9.37", "25.63 15.03 13.38 11.85 11.29 10.75 10.33"),
}
_OQ_OPT_WA = {  # (method, scheme) -> "wikitext2/c4" per model (OPT-6.7B, 13B, 30B, 66B)
    ("smoothquant", "w6a6q6kv6"): ["11.34/12.14", "10.56/11.40", "9.67/10.81", "10.72/11.60"],
    ("omniquant", "w6a6q6kv6"): ["10.96/11.81", "10.21/11.27", "9.62/10.76", "9.42/10.32"],
    ("smoothquant", "w4a4q4kv4"): ["1.8e4/1.5e4", "7.4e3/5.6e3", "1.2e4/8.3e3", "2.2e5/1.8e5"],
    ("omniquant", "w4a4q4kv4"): ["12.24/13.56", "11.65/13.46", "10.60/11.89", "10.29/11.35"],
}
VALUES += [
    *(v for scheme, (wiki, c4) in _OQ_OPT_WEIGHT_ONLY.items()
      for v in _ppl_table("OmniQuant (ICLR'24) Tables A20 / A22", _OPT,
                          {"fp16" if scheme == "w16a16" else "omniquant":
                           [f"{w}/{c}" for w, c in zip(wiki.split(), c4.split())]},
                          lambda m, s=scheme: s, "omniquant-seed0",
                          "" if scheme == "w16a16" else "LET on, as the OPT scripts (--method-opt let=on)")),
    *(v for (method, scheme), cells in _OQ_OPT_WA.items()
      for v in _ppl_table("OmniQuant (ICLR'24) Table A25", _OPT[3:], {method: cells}, lambda m, s=scheme: s,
                          "omniquant-seed0", "the numbers OmniQuant's paper prints for SmoothQuant (its codebase)"
                          if method == "smoothquant" else "")),
]

# SmoothQuant (ICML'23) Tables 3 and 4: zero-shot averages in the 2022 lm-eval harness and lm-eval's WikiText word
# perplexity, per quantization level (O1: per-tensor weights, per-token dynamic activations; O2: per-tensor dynamic;
# O3: per-tensor static); alpha 0.5, 512 Pile sentences. Paper-only cells: no task of this suite measures under
# that harness. OPT-175B's weights are given out by Meta on request, not on the hub.
_SQ_LEVELS = {"O1": "per-tensor W, per-token dynamic A", "O2": "per-tensor W, per-tensor dynamic A",
              "O3": "per-tensor W, per-tensor static A"}
_SQ7 = "LAMBADA, HellaSwag, PIQA, WinoGrande, OpenBookQA, RTE, COPA"
_SQ4 = "WinoGrande, HellaSwag, PIQA, LAMBADA"
VALUES += [
    *(PaperValue("SmoothQuant (ICML'23) Table 3", "opt-175b", m, s, task, metric, v, proto, note,
                 setting=f"{lvl}: {_SQ_LEVELS[lvl]}" if lvl else "")
      for m, s, lvl, avg, wiki in (("fp16", "w16a16", "", 66.9, 10.99), ("smoothquant", "w8a8", "O1", 66.5, 11.11),
                                   ("smoothquant", "w8a8", "O2", 66.4, 11.14),
                                   ("smoothquant", "w8a8", "O3", 66.8, 11.17))
      for task, metric, v, proto, note in (("sq7", "avg", avg, "lmeval/sq7/smoothquant-harness", _SQ7),
                                           ("wikitext", "word_perplexity", wiki, "lmeval/wikitext/smoothquant-harness",
                                            ""))),
    *(PaperValue("SmoothQuant (ICML'23) Table 4", "bloom-176b", m, s, "sq4", "avg", v,
                 "lmeval/sq4/smoothquant-harness", _SQ4, setting=f"{lvl}: {_SQ_LEVELS[lvl]}" if lvl else "")
      for m, s, lvl, v in (("fp16", "w16a16", "", 68.2), ("smoothquant", "w8a8", "O1", 68.3),
                           ("smoothquant", "w8a8", "O2", 68.4), ("smoothquant", "w8a8", "O3", 67.4))),
]

# Norm-tweaking's (AAAI'24) cells are not in VALUES: its tables (LAMBADA last-token accuracy on GLM/OPT/LLaMA/BLOOM)
# are images in every rendering this suite's authors could reach, and a number that cannot be traced to its table is
# not put beside ours. Its settings are a reproduction card below (``expect`` empty: "settings card").

INCONSISTENT = [
    ("DuQuant Table F21: DuQuant LLaMA3-8B 8.53 / 12.01", "Table 5 gives 8.56 / 11.98 for the same cell; Table 5 is used"),
    ("DuQuant Table F21: QuaRot-RTN zero-shot 'Avg' 46.03 / 44.04", "its own per-task numbers average 58.73 / 55.12"),
    ("DuQuant Table E18: WikiText2 calibration 6.25 / 7.87", "Table 1 gives 6.28 / 7.90 for the same setting"),
    ("OmniQuant Table A25: OPT-13B FP16 10.13 / 11.20", "Tables A20 / A22 give 10.12 / 11.19; those are used"),
]


@dataclass(frozen=True)
class Card:
    """A reproduction card: run ``command`` (with a GPU and the hub) and expect ``expect`` within ``rel_tol``. A
    *settings card* (``expect`` empty) gives the reference's settings where no paper value is verified here."""

    method: str
    model: str
    scheme: str
    command: str  # the pytest bench/ options
    expect: dict  # task -> value
    rel_tol: float
    source: str
    settings: dict = field(default_factory=dict)  # the paper's knobs, with where each comes from
    notes: str = ""

    def argv(self) -> list[str]:
        return shlex.split(self.command)


_PPL = "--tasks ppl-wikitext2,ppl-c4 --seqlen 2048"
CARDS = [
    Card("duquant", "llama-2-7b", "w4a4q4kv4",
         f"--method duquant --model llama-2-7b --scheme w4a4q4kv4 {_PPL} --calib wikitext2 --nsamples 128 "
         "--calib-seqlen 2048 --calib-seed 2", {"ppl-wikitext2": 6.28, "ppl-c4": 7.90}, 0.02,
         "DuQuant Table 1",
         {"block_size": "128 (run.sh)", "steps": "256 (run.sh)", "permutation_times": "1 (main.py)",
          "alpha": "0.6 (run.sh)", "swc": "0.8 (run.sh)", "lac": "0.9 (run.sh)",
          "grids": "asymmetric weights and activations (main.py L353-377)"},
         "the method's defaults are these settings"),
    Card("duquant-lwc", "llama-2-7b", "w4a4q4kv4",
         f"--method duquant-lwc --model llama-2-7b --scheme w4a4q4kv4 {_PPL} --calib wikitext2 --nsamples 128 "
         "--calib-seqlen 2048 --calib-seed 2", {"ppl-wikitext2": 6.08, "ppl-c4": 7.79}, 0.02,
         "DuQuant Table 1",
         {"alpha": "0.5 (run_lwc.sh)", "epochs": "20 (run_lwc.sh)", "lwc_lr": "1e-2 (main.py)",
          "lwc init": "sigmoid(4.0)"}),
    Card("duquant", "llama-3-8b", "w4a4q4kv4",
         f"--method duquant --model llama-3-8b --scheme w4a4q4kv4 {_PPL} --calib wikitext2 --nsamples 128 "
         "--calib-seqlen 2048 --calib-seed 2", {"ppl-wikitext2": 8.56, "ppl-c4": 11.98}, 0.03,
         "DuQuant Table 5", {}, "Table F21's 8.53 / 12.01 for the same cell is a paper inconsistency"),
    Card("duquant", "mistral-7b", "w4a4q4kv4",
         f"--method duquant --model mistral-7b --scheme w4a4q4kv4 {_PPL} --calib wikitext2 --nsamples 128 "
         "--calib-seqlen 2048 --calib-seed 2", {"ppl-wikitext2": 5.86, "ppl-c4": 8.48}, 0.03,
         "DuQuant Table D6"),
    Card("quarot-gptq", "llama-2-7b", "w4a4kv4",
         "--method quarot-gptq --model llama-2-7b --scheme w4a4kv4 --method-opt w_clip=true,clips=paper "
         "--tasks ppl-wikitext2 --seqlen 2048 --calib wikitext2 --nsamples 128 --calib-seqlen 2048 --calib-seed 0",
         {"ppl-wikitext2": 6.10}, 0.02, "QuaRot (NeurIPS'24) Table 1 = DuQuant Table F22",
         {"w_clip": "GPTQ MSE clip search (README --w_clip)", "clips": "activation 0.9, K/V 0.95, asymmetric K/V "
          "group 128 (issues spcl/QuaRot#43, #55; recalled, unverified)", "percdamp": "0.01", "act_order": "off"},
         "users get 6.31-6.35 without the clip ratios (spcl/QuaRot#55)"),
    Card("quarot", "llama-2-7b", "w4a4kv4",
         "--method quarot --model llama-2-7b --scheme w4a4kv4 --method-opt clips=paper --tasks ppl-wikitext2 "
         "--seqlen 2048", {"ppl-wikitext2": 8.37}, 0.03, "DuQuant Table F22 (QuaRot's setting)"),
    Card("omniquant", "llama-2-7b", "w4a4q4kv4",
         f"--method omniquant --model llama-2-7b --scheme w4a4q4kv4 {_PPL} --c4-variant omniquant-seed0 "
         "--method-opt epochs=20,let_lr=1e-3,alpha=0.75 --calib wikitext2 --nsamples 128 --calib-seqlen 2048 "
         "--calib-seed 2", {"ppl-wikitext2": 14.26, "ppl-c4": 18.02}, 0.10, "OmniQuant (ICLR'24) = DuQuant Table 1",
         {"let_lr": "1e-3 (scripts/Llama-2/Llama-2-7b/w4a4.sh)", "alpha": "0.75 (same script)",
          "epochs": "20", "aug_loss": "off for Llama-2"},
         "re-runs give 16.7-20 depending on the GPU (OpenGVLab/OmniQuant#70): hence the 10% tolerance"),
    Card("smoothquant", "llama-2-7b", "w4a4q4kv4",
         f"--method smoothquant --model llama-2-7b --scheme w4a4q4kv4 {_PPL} --c4-variant omniquant-seed0 "
         "--calib wikitext2 --nsamples 512 "
         "--calib-seqlen 512 --calib-seed 42", {"ppl-wikitext2": 83.12, "ppl-c4": 77.27}, 0.25,
         "DuQuant Table 1",
         {"calibration": "512 x 512 Pile-val, shuffle seed 42 (not reachable here: wikitext2 instead)"},
         "a W4A4 collapse: large spread between re-runs is expected"),
    # LayerNorm-with-bias families ------------------------------------------------------------------------------
    Card("gptq", "opt-66b", "w4a16",
         "--method gptq --model opt-66b --scheme w4a16 --wgrid asym --method-opt true_sequential=false "
         "--tasks ppl-wikitext2 --seqlen 2048 --calib c4 --nsamples 128 --calib-seqlen 2048 --calib-seed 0",
         {"ppl-wikitext2": 9.55}, 0.02, "GPTQ repository README (IST-DASLab/gptq)",
         {"grid": "asymmetric min/max (opt.py Quantizer, --sym off)", "sequential": "one pass per block (opt.py "
          "opt_sequential: every linear's Hessian from the same inputs)", "calibration": "128 x 2048 random c4 "
          "segments, seed 0 (datautils.get_c4)", "percdamp": "0.01", "act_order": "off (on: 9.34, README)"}),
    Card("smoothquant", "opt-13b", "w8a8",
         "--method smoothquant --model opt-13b --scheme w8a8 --tasks ppl-wikitext2 --seqlen 2048 --calib c4 "
         "--nsamples 512 --calib-seqlen 512 --calib-seed 42", {}, 0.0,
         "SmoothQuant repository (examples/smoothquant_opt_demo.ipynb, smoothquant/ppl_eval.py)",
         {"alpha": "0.5 (the demo's smooth_lm(model, act_scales, 0.5); the reference table here)",
          "calibration": "512 x 512 Pile-val, seed 42 (calibration.py; c4 here)",
          "quantizers": "per-channel weights, per-token activations (ppl_eval.py; the OPT demo uses per-tensor)"},
         "settings card: the paper's OPT numbers are OPT-175B's (Table 3, in papers' values) under the 2022 "
         "lm-eval harness, not a task here (the demo's LAMBADA[:1000] last-token "
         "accuracy, FP16 0.786 / SmoothQuant W8A8 0.793, is per-tensor and not a task of this suite)"),
    Card("omniquant", "opt-6.7b", "w4a4q4kv4",
         f"--method omniquant --model opt-6.7b --scheme w4a4q4kv4 --method-opt epochs=20,alpha=0.75 {_PPL} "
         "--c4-variant omniquant-seed0 --calib wikitext2 --nsamples 128 --calib-seqlen 2048 --calib-seed 2",
         {"ppl-wikitext2": 12.24, "ppl-c4": 13.56}, 0.10,
         "OmniQuant (ICLR'24) Table A25; scripts/opt/opt-6.7b/w4a4.sh",
         {"lwc, let": "on (the script's --lwc --let; LET shifts on OPT: use_shift)", "alpha": "0.75 (the script)",
          "epochs": "20", "Q/K/V": "at the activation bits (main.py q/k/v_quant_params; int_opt_layer.py)",
          "calibration": "128 x 2048 wikitext2, seed 2 (main.py defaults)"},
         "the LLaMA re-runs spread by 10-40% across GPUs (OpenGVLab/OmniQuant#70): hence the 10% tolerance"),
    Card("omniquant", "opt-125m", "w4a16",
         f"--method omniquant --model opt-125m --scheme w4a16 --method-opt epochs=20,let=on {_PPL} "
         "--c4-variant omniquant-seed0 --calib wikitext2 --nsamples 128 --calib-seqlen 2048 --calib-seed 2",
         {"ppl-wikitext2": 29.45, "ppl-c4": 26.36}, 0.05,
         "OmniQuant (ICLR'24) Tables A20 / A22; scripts/opt/opt-125m/w4a16.sh",
         {"let": "on even weight-only (the OPT scripts pass --let)", "epochs": "20",
          "grid": "asymmetric min/max per output channel (main.py: symmetric off)"}),
    Card("gptq+normtweak", "bloom-176b", "w2a16g64",
         "--method gptq+normtweak --model bloom-176b --scheme w2a16g64 --method-opt act_order=true,nt_lr=1e-4 "
         "--tasks ppl-wikitext2 --seqlen 2048 --calib generated --nsamples 128 --calib-seqlen 2048 --calib-seed 1",
         {}, 0.0, "norm-tweaking authors' scripts (hope/hope_gptq.sh, bloom_ln_mean_4.py)",
         {"gptq": "--act-order --sym, group 64, percdamp 0.01", "lr": "1e-4 with the x10 depth schedule",
          "data": "128 x 2048 self-generated (qat_gen), seed 1", "tweaked": "weight and bias of both LayerNorms"},
         "settings card: the paper reports LAMBADA last-token accuracy, not verified here"),
    Card("fp16", "llama-2-7b", "w16a16", f"--method fp16 --model llama-2-7b {_PPL}",
         {"ppl-wikitext2": 5.47, "ppl-c4": 6.97}, 0.005, "DuQuant Table 1", {},
         "the protocol check: a miss here means the data or the windows differ, not the method"),
]


@dataclass(frozen=True)
class PaperCost:
    """A cost a paper reports: the time to quantize a model, or a speedup over FP16 of its kernels."""

    source: str
    model: str
    method: str
    scheme: str
    what: str  # "quantize" (seconds) or "layer <prefill|decode> bs <n>" (speedup over FP16)
    value: float
    setting: str  # where and how it was measured
    device: str  # the GPU, matched against ours before comparing


_A100 = "one A100, the method's reference recipe"
_3090 = "one LLaMA layer, QuaRot's W4A4 kernel (DuQuant §4), seq 2048"
COSTS = [
    # DuQuant Table 12 (F24 for QuaRot): quantization runtime, LLaMA2-7B / 13B / 70B
    *(PaperCost("DuQuant Table 12", m, "duquant", "w4a4q4kv4", "quantize", v, _A100, "A100")
      for m, v in (("llama-2-7b", 50), ("llama-2-13b", 71), ("llama-2-70b", 270))),
    *(PaperCost("DuQuant Table 12", m, "omniquant", "w4a4q4kv4", "quantize", v, _A100, "A100")
      for m, v in (("llama-2-7b", 2.0 * 3600), ("llama-2-13b", 3.2 * 3600), ("llama-2-70b", 14.6 * 3600))),
    *(PaperCost("DuQuant Table 12 (F24)", m, "quarot-gptq", "w4a4kv4", "quantize", v, _A100, "A100")
      for m, v in (("llama-2-7b", 20 * 60), ("llama-2-13b", 36 * 60), ("llama-2-70b", 5.1 * 3600))),
    # DuQuant Table 9: layer prefill speedup over FP16; Table 10 / E13: layer decode at batch 64
    *(PaperCost("DuQuant Table 9", m, "duquant", "w4a4", f"layer prefill bs {b}", v, _3090, "3090")
      for m, vs in (("llama-2-7b", (1.95, 2.03, 2.08)), ("llama-2-13b", (2.15, 2.30, 2.34)))
      for b, v in zip((1, 4, 16), vs)),
    *(PaperCost("DuQuant Table 10", "llama-2-7b", meth, "w4a4", "layer decode bs 64", v, _3090, "3090")
      for meth, v in (("smoothquant", 1.508), ("quarot", 1.442), ("duquant", 1.321))),
]


def paper_values(model: str | None = None) -> list[PaperValue]:
    return [v for v in VALUES if model is None or v.model == model]


def lookup(model: str, method: str, scheme: str, task: str, metric: str) -> list[PaperValue]:
    """Every paper value of one cell (a cell several tables print, e.g. FP16, comes once per table)."""
    return [v for v in VALUES if v.key == (model, method, scheme, task, metric)]
