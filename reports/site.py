"""The overview page ``reports/README.md`` and its plots, generated from a results directory.

    python -m quantbench.reports.site reports/results -o reports/README.md   # plots go to reports/plots/

Sections: the method x scheme matrix of the offline default model on the main perplexity protocol (every
registered method, the W4A4 / W6A6 / W4A16 / W3A16 columns first), the lm-eval family tables, the papers'
numbers beside ours for the real models (cells only a GPU user can fill), the reproduction cards, and the plots
(matplotlib PNG): PPL against bits per method, and the method ranking at W4A4.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

from quantbench.errors import ConfigError
from quantbench.pipeline import resolve
from quantbench.quant import parse_scheme
from quantbench.registry import METHODS
from quantbench.reports import leaderboard
from quantbench.reports.papers import CARDS, COSTS, INCONSISTENT
from quantbench.reports.speed import read_tables

MAIN_MODEL = "smollm2-135m"
MAIN_PROTOCOL = "ppl/gptq/austen-test/seqlen2048/first8windows"  # tox -e bench's
HEADLINE = ("w4a4", "w6a6", "w4a16", "w3a16")
WEIGHT_ONLY = ("w4a16g64", "w4a16", "w3a16", "w2a16g64")  # the plot's x axes, bits falling
WEIGHT_ACT = ("w8a8", "w6a6", "w4a8", "w4a4")


def _bits(r: dict) -> tuple[int, int]:
    s = r.get("scheme_spec") or {}
    return leaderboard._bits(s.get("w")), leaderboard._bits(s.get("a"))


def _methods() -> list[str]:
    return sorted(n for n in METHODS if getattr(METHODS.get(n), "role", "") != "plugin")  # plug-ins: as "base+plugin"


def matrix(records: list[dict], model: str = MAIN_MODEL, protocol: str = MAIN_PROTOCOL) -> tuple[list, list, dict]:
    """(headers, rows, cells): PPL per (method, scheme); several records of one cell (other options or
    calibration) are all shown, ' / '-separated in creation order."""
    recs = [r for r in leaderboard.latest(records) if r["model"] == model and r["protocol"] == protocol
            and r["metric"] == "ppl"]
    cells: dict[tuple, list] = defaultdict(list)
    for r in sorted(recs, key=lambda r: r.get("created", "")):
        cells[(r["method"], r["scheme"])].append(r)
    others = sorted({s for _, s in cells if s not in HEADLINE and s != "w16a16"},
                    key=lambda s: (-_bits(cells[next(k for k in cells if k[1] == s)][0])[0], s))
    schemes = [*HEADLINE, *others]
    methods = list(dict.fromkeys([*_methods(), *sorted({m for m, _ in cells})]))
    rows = []
    for m in methods:
        if m == "fp16":  # its one cell is the page's reference line, not a scheme column
            continue
        rows.append([m, *[" / ".join(leaderboard._fmt(r["value"]) for r in cells.get((m, s), [])) or _empty(m, s)
                          for s in schemes]])
    return ["method", *schemes], rows, cells


def _empty(method: str, scheme: str) -> str:
    """An empty cell: ``n/a`` where the scheme is weight-only and the method exists to quantize activations
    (``Method.weight_only``), else ``·`` (not run)."""
    try:
        s, cls = parse_scheme(scheme), resolve(method)
    except ConfigError:
        return "·"
    return "n/a" if s.a is None and s.w is not None and not cls.weight_only else "·"


def plots(cells: dict, out_dir: Path, model: str = MAIN_MODEL) -> list[Path]:
    """PPL against bits per method and the W4A4 ranking; PNG files (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    panels = (("weight-only", [x for x in WEIGHT_ONLY if any(k[1] == x for k in cells)]),
              ("weights and activations", [x for x in WEIGHT_ACT if any(k[1] == x for k in cells)]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (title, schemes) in zip(axes, panels):
        for m in sorted({m for m, s in cells if s in schemes}):
            xs = [i for i, x in enumerate(schemes) if (m, x) in cells]
            ax.plot(xs, [min(r["value"] for r in cells[(m, schemes[i])]) for i in xs], "o-", label=m)
        if ("fp16", "w16a16") in cells:
            ax.axhline(cells[("fp16", "w16a16")][0]["value"], color="k", ls="--", lw=1, label="fp16")
        ax.set_xticks(range(len(schemes)), schemes)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("perplexity (log; lower is better)")
    fig.suptitle(f"{model}: PPL against bits ({MAIN_PROTOCOL}; best record per cell)", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"ppl-vs-bits-{model}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    w4a4 = sorted(((min(r["value"] for r in rs), m) for (m, s), rs in cells.items() if s == "w4a4"))
    if w4a4:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(w4a4)))
        ax.barh([m for _, m in w4a4][::-1], [v for v, _ in w4a4][::-1])
        ax.set_xscale("log")
        ax.set_xlabel("perplexity at W4A4 (log; lower is better)")
        ax.set_title(f"{model}: method ranking at W4A4")
        fig.tight_layout()
        path = out_dir / f"ranking-w4a4-{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# the layer benchmark's variants (bench/test_layer_speed.py) as (method, scheme) cells of the accuracy matrix
LAYER_VARIANTS = {"bf16": ("fp16", "w16a16"), "w4a4 rtn": ("rtn", "w4a4"), "w4a4 duquant": ("duquant", "w4a4"),
                  "w4a4 quarot": ("quarot", "w4a4"), "w4a16 g128": ("rtn", "w4a16g128")}
SPEED_CASES = (("prefill", 16), ("decode", 1))  # (phase, batch) of the layer table, one marker each


def accuracy_vs_speed(cells: dict, layer_tables: dict[str, list[dict]], out_dir: Path,
                      model: str = MAIN_MODEL) -> list[tuple[Path, str]]:
    """Per device with a layer table: each variant's speedup over bf16 (a LLaMA-2-7B decoder layer, Triton INT4
    backend) against the PPL of the same method and scheme on ``model``; (PNG, caption) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for device, rows in layer_tables.items():
        points = []
        for phase, batch in SPEED_CASES:
            for r in rows:
                cell = LAYER_VARIANTS.get(str(r.get("variant")))
                if r.get("phase") == phase and r.get("batch") == batch and cell in cells:
                    points.append((phase, batch, r["variant"], float(r["speedup vs bf16"]),
                                   min(x["value"] for x in cells[cell])))
        if not points:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for (phase, batch), marker in zip(SPEED_CASES, "os"):
            pts = [p for p in points if p[:2] == (phase, batch)]
            ax.scatter([p[3] for p in pts], [p[4] for p in pts], marker=marker, label=f"{phase}, batch {batch}")
            for p in pts:
                ax.annotate(p[2], (p[3], p[4]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="k", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel(f"speedup over bf16: LLaMA-2-7B decoder layer on {device}")
        ax.set_ylabel(f"{model} perplexity (log)")
        ax.legend(fontsize=7, loc="upper center")
        fig.tight_layout()
        path = out_dir / f"accuracy-vs-speed-{device.replace(' ', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        missing = sorted({v for v, c in LAYER_VARIANTS.items() if c not in cells})
        made.append((path, f"Accuracy against speed: x = speedup of a LLaMA-2-7B decoder layer over bf16 on {device} "
                           f"(`reports/layer-{device.replace(' ', '-')}.md`, Triton INT4 backend, random weights); "
                           f"y = the same method and scheme's PPL on {model} above. Two models on purpose: speed needs "
                           "the real shapes and a GPU, accuracy here is the offline model's."
                           + (f" Not plotted (no accuracy record of that cell): {', '.join(missing)}." if missing
                              else "")))
    return made


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def cost_table(records: list[dict], layer_tables: dict[str, list[dict]]) -> list[str]:
    """The papers' quantization times and kernel speedups (:data:`papers.COSTS`) beside ours: our latest calibrated
    (not cached) record's ``quant_wall_s`` of the same model, method and scheme, and the layer benchmark's speedup
    of the same method and phase (LLaMA-2-7B shapes). A figure measured on another GPU is marked ``≠``."""
    recs = leaderboard.latest(records)
    rows = []
    for c in COSTS:
        ours = []
        if c.what == "quantize":
            mine = [r for r in recs if (r["model"], r["method"], r["scheme"]) == (c.model, c.method, c.scheme)
                    and r.get("quant_wall_s") is not None and not str(r.get("plan_source", "")).startswith("cache")]
            if mine:
                r = max(mine, key=lambda r: r.get("created", ""))
                ours.append((_duration(r["quant_wall_s"]), (r.get("device") or {}).get("name", "?")))
        elif c.model == "llama-2-7b":  # the layer benchmark's shapes
            _, phase, _, batch = c.what.split()
            for device, table in layer_tables.items():
                ours += [(f"{r['speedup vs bf16']:.2f}x", device) for r in table
                         if r.get("phase") == phase and r.get("batch") == int(batch)
                         and LAYER_VARIANTS.get(str(r.get("variant"))) == (c.method, c.scheme)]
        paper = _duration(c.value) if c.what == "quantize" else f"{c.value:.2f}x"
        cells = [f"{v}{'' if c.device in d else ' ≠'}" for v, d in ours]
        rows.append([c.model, c.method, c.scheme, c.what, paper, c.setting, " / ".join(cells),
                     " / ".join(d for _, d in ours), c.source])
    return ["### Quantization time and speed: the papers' figures beside ours", "",
            "*ours*: quantization wall time of our latest calibrated record of the cell (a plan read from the cache "
            "does not count), and the speedup over bf16 of `bench/test_layer_speed.py` (Triton INT4 backend); `≠` = "
            "measured on another GPU, not comparable (the papers' speedups are QuaRot's INT4 kernel on an RTX 3090; "
            "Hopper has no INT4 tensor cores). Empty: not measured yet.", "",
            tabulate(rows, headers=["model", "method", "scheme", "what", "paper", "paper's setting", "ours",
                                    "ours measured on", "source"], tablefmt="github", disable_numparse=True), ""]


def render(records: list[dict], out_path: Path, results_dir: str = "reports/results",
           speed_dir: Path | None = None) -> str:
    headers, rows, cells = matrix(records)
    fp = cells.get(("fp16", "w16a16"))
    made = plots(cells, out_path.parent / "plots") if cells else []
    speed = accuracy_vs_speed(cells, read_tables("layer", speed_dir), out_path.parent / "plots") if cells else []
    out = ["# quantbench results", "",
           f"Generated by `python -m quantbench.reports.site {results_dir} -o {out_path}` (part of `tox -e bench`) "
           "from the result records; each number's record (config hash, seed, versions, device) is in "
           "`reports/results/`, and `reports/leaderboard.md` has every table in full.", "",
           f"## {MAIN_MODEL}: every method x scheme (PPL, `{MAIN_PROTOCOL}`)", "",
           f"FP16 reference: {leaderboard._fmt(fp[0]['value']) if fp else 'not run'}. "
           "`·` = not run; `n/a` = weight-only, outside the reference scope of a method that exists to quantize "
           "activations (SmoothQuant, DuQuant: `Method.weight_only`; it would run if asked). A cell with several "
           "values: several records of the cell (other method options or calibration; see the leaderboard). The "
           "W4A16/W3A16 columns are per-channel weights; grouped ones are among the other columns.", "",
           tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), ""]
    out += [f"![{p.stem}](plots/{p.name})" for p in made] + ([""] if made else [])
    for path, caption in speed:
        out += [f"![{path.stem}](plots/{path.name})", "", caption, ""]
    if not speed:
        out += ["No speed tables yet for an accuracy-vs-speed plot (`bash bench/gpu.sh` on a GPU writes "
                "`reports/layer-<device>.md`).", ""]
    fam = [r for r in leaderboard.latest(records) if r["model"] == MAIN_MODEL
           and (r.get("task_config") or {}).get("family") in leaderboard.FAMILIES]
    if fam:
        out += [f"## {MAIN_MODEL}: lm-eval tasks", "", *leaderboard.family_tables(fam)]
    out += ["## The papers' numbers beside ours (real models: a GPU and the hub)", ""]
    out += leaderboard.paper_tables(records)
    out += cost_table(records, read_tables("layer", speed_dir))
    out += ["Paper-internal inconsistencies, not used as targets: " + "; ".join(f"{w} — {y}" for w, y in INCONSISTENT)
            + ".", "", "## Reproduction cards", "",
            "Run `pytest bench/ <command>` on a GPU machine with the hub; expect each value within the tolerance. "
            "The settings column names where each knob comes from.", ""]
    rows = [[c.method, c.model, c.scheme, ", ".join(f"{t} {v}" for t, v in c.expect.items()), f"±{100 * c.rel_tol:g}%",
             c.source, "; ".join(f"{k}: {v}" for k, v in c.settings.items()) + (f" — {c.notes}" if c.notes else ""),
             f"`{c.command}`"] for c in CARDS]
    out += [tabulate(rows, headers=["method", "model", "scheme", "expect", "tol", "source", "settings", "command"],
                     tablefmt="github", disable_numparse=True), ""]
    out += ["## Provenance", "", leaderboard._provenance(leaderboard.latest(records)), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args, records = leaderboard.read_args(__doc__, argv, "the page (default: reports/README.md)", "reports/README.md")
    if records is None:
        return 1
    out = Path(args.output)
    text = render(records, out, args.results_dir)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
