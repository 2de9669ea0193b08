"""The overview page of a results directory: ``README.md`` (markdown), ``index.html`` (one self-contained page:
sortable tables, the plots inlined, each number's provenance on hover and click) and ``plots/``.

    quantbench site reports/results -o reports/README.md       # index.html and plots/ beside it

Models, protocols and schemes come from the records: one method x scheme matrix per (model, perplexity protocol)
(every registered method a row; the W4A4 / W6A6 / W4A16 / W3A16 columns first), the lm-eval family tables, the
papers' numbers beside ours for the real models, the reproduction cards, and the plots (matplotlib PNG): PPL
against bits per method and the method ranking at W4A4, one colour per method in every figure. Records from several
code revisions, or from a dirty tree, are named in a warning on the page and on stderr.
"""
from __future__ import annotations

import logging
import sys
from collections import Counter, defaultdict
from pathlib import Path

from tabulate import tabulate

from quantbench.errors import ConfigError
from quantbench.pipeline import resolve
from quantbench.quant import parse_scheme
from quantbench.registry import METHODS
from quantbench.reports import html, leaderboard
from quantbench.reports.papers import CARDS, COSTS, INCONSISTENT
from quantbench.reports.speed import read_tables

log = logging.getLogger(__name__)
MAIN_MODEL = "smollm2-135m"
MAIN_PROTOCOL = "ppl/gptq/austen-test/seqlen2048/first8windows"  # the sweep's (tox -e sweep)
HEADLINE = ("w4a4", "w6a6", "w4a16", "w3a16")
WEIGHT_ONLY = ("w4a16g64", "w4a16g128", "w4a16", "w3a16", "w2a16g64")  # the plot's x axes, bits falling
WEIGHT_ACT = ("w8a8", "w6a6", "w4a8", "w4a4")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")


def _bits(r: dict) -> tuple[int, int]:
    s = r.get("scheme_spec") or {}
    return leaderboard._bits(s.get("w")), leaderboard._bits(s.get("a"))


def _methods() -> list[str]:
    # plug-ins appear as "base+plugin"; imported checkpoints (load) by their label
    return sorted(n for n in METHODS if getattr(METHODS.get(n), "role", "") not in ("plugin", "import"))


def colors(records: list[dict]) -> dict[str, str]:
    """One colour per method, the same in every figure of a page: registered methods first (sorted), then the
    pipelines and others the records name."""
    names = list(dict.fromkeys([*_methods(), *sorted({leaderboard.row_name(r) for r in records})]))
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}


def sections(records: list[dict]) -> list[tuple[str, str]]:
    """The (model, protocol) pairs with perplexity records, most records first (the main matrix leads)."""
    n = Counter((r["model"], r["protocol"]) for r in leaderboard.latest(records) if r["metric"] == "ppl")
    return sorted(n, key=lambda k: (-n[k], k))


def matrix(records: list[dict], model: str = MAIN_MODEL, protocol: str = MAIN_PROTOCOL) -> tuple[list, list, dict]:
    """(headers, rows, cells): PPL per (method, scheme); several records of one cell (other options or
    calibration) are all shown, ' / '-separated in creation order."""
    recs = [r for r in leaderboard.latest(records) if r["model"] == model and r["protocol"] == protocol
            and r["metric"] == "ppl"]
    cells: dict[tuple, list] = defaultdict(list)
    for r in sorted(recs, key=lambda r: r.get("created", "")):
        cells[(leaderboard.row_name(r), r["scheme"])].append(r)
    others = sorted({s for _, s in cells if s not in HEADLINE and s != "w16a16"},
                    key=lambda s: (-_bits(cells[next(k for k in cells if k[1] == s)][0])[0], s))
    schemes = [*HEADLINE, *others]
    methods = list(dict.fromkeys([*_methods(), *sorted({m for m, _ in cells})]))
    rows = []
    for m in methods:
        if m == "fp16":  # its one cell is the page's reference line, not a scheme column
            continue
        rows.append([m, *[" / ".join(leaderboard.plus_minus(r) for r in cells.get((m, s), [])) or _empty(m, s)
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


def _label(r: dict, several: bool) -> str:
    name = leaderboard.row_name(r)
    return f"{name} ({r['config_hash'][:6]})" if several else name


def _plain_ticks(axis) -> None:
    """Log-axis ticks as plain numbers (20, 30, 50, 100, ...), not ``3×10¹``."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def ties(records: list[dict], model: str, protocol: str) -> list[str]:
    """The pairs of perplexity records (same model, protocol and evaluation windows) whose paired 95 % interval of
    the difference contains 0: differences the evaluation cannot tell from noise."""
    recs = sorted((r for r in leaderboard.latest(records) if r["model"] == model and r["protocol"] == protocol
                   and r["metric"] == "ppl" and r.get("items")), key=lambda r: r["value"])
    out = []
    for i, a in enumerate(recs):
        for b in recs[i + 1:]:
            d = leaderboard.delta(b, a)
            if d and d["tie"]:
                out.append(f"{leaderboard._method(b)} {b['scheme']} − {leaderboard._method(a)} {a['scheme']}: "
                           f"{leaderboard.delta_text(d).removesuffix(' ' + leaderboard.TIE)}")
    return out


def plots(cells: dict, out_dir: Path, model: str = MAIN_MODEL, protocol: str = MAIN_PROTOCOL,
          palette: dict[str, str] | None = None, tag: str = "") -> list[Path]:
    """PPL against bits per method (markers on the scheme axis, no lines: the schemes are categories) and the W4A4
    ranking (bars with their values and the FP16 line). Every record is drawn: a cell with several records (other
    options or calibration) gets one marker or bar each, labelled with its config hash."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = palette or colors([r for rs in cells.values() for r in rs])
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    fp = cells.get(("fp16", "w16a16"))
    panels = [(title, [x for x in axis if any(k[1] == x for k in cells)])
              for title, axis in (("weight-only", WEIGHT_ONLY), ("weights and activations", WEIGHT_ACT))]
    panels = [p for p in panels if p[1]]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4.5), sharey=True, squeeze=False)
        methods = sorted({m for m, s in cells if any(s in p[1] for p in panels) and m != "fp16"})
        for ax, (title, schemes) in zip(axes[0], panels):
            for j, m in enumerate(methods):
                offset = (j - (len(methods) - 1) / 2) * 0.6 / max(len(methods), 1)  # side by side within a scheme
                xs, ys = [], []
                for i, x in enumerate(schemes):
                    for r in cells.get((m, x), []):
                        xs.append(i + offset)
                        ys.append(r["value"])
                if xs:
                    ax.plot(xs, ys, "o", ls="none", color=palette[m], label=m, ms=6)
            if fp:
                ax.axhline(fp[0]["value"], color="k", ls="--", lw=1, label=f"fp16 {leaderboard._fmt(fp[0]['value'])}")
            ax.set_xticks(range(len(schemes)), schemes)
            ax.set_xlim(-0.5, len(schemes) - 0.5)
            ax.set_yscale("log")
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("perplexity (log; lower is better)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, fontsize=7, loc="center right")
        fig.suptitle(f"{model}: perplexity by scheme ({protocol}; every record drawn)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 0.84, 1))
        path = out_dir / f"ppl-vs-bits-{model}{tag}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    w4a4 = [(r["value"], m, r) for (m, s), rs in cells.items() if s == "w4a4" for r in rs]
    if w4a4:
        w4a4.sort(key=lambda t: t[0])
        several = Counter(m for _, m, _ in w4a4)
        fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.42 * len(w4a4)))
        labels = [_label(r, several[m] > 1) for _, m, r in w4a4][::-1]
        values = [v for v, _, _ in w4a4][::-1]
        cis = [(r.get("interval") or {}).get("ci95") for _, _, r in w4a4][::-1]
        err = [[v - c[0] if c else 0 for v, c in zip(values, cis)], [c[1] - v if c else 0 for v, c in zip(values, cis)]]
        bars = ax.barh(labels, values, color=[palette[m] for _, m, _ in w4a4][::-1], xerr=err,
                       error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "#333"})
        ax.bar_label(bars, labels=[leaderboard.plus_minus(r) for _, _, r in w4a4][::-1], padding=3, fontsize=7)
        if fp:
            ax.axvline(fp[0]["value"], color="k", ls="--", lw=1, label=f"fp16 {leaderboard._fmt(fp[0]['value'])}")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
        ax.set_xlim(right=max(values) * 4)
        ax.set_xlabel("perplexity at W4A4 (log; lower is better)")
        ax.set_title(f"{model}: methods at W4A4, best first ({protocol})", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"ranking-w4a4-{model}{tag}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# the layer benchmark's variants (bench/test_layer_speed.py) as (method, scheme) cells of the accuracy matrix
LAYER_VARIANTS = {"bf16": ("fp16", "w16a16"), "w4a4 rtn": ("rtn", "w4a4"), "w4a4 duquant": ("duquant", "w4a4"),
                  "w4a4 quarot": ("quarot", "w4a4"), "w4a16 g128": ("rtn", "w4a16g128")}
SPEED_CASES = (("prefill", 16), ("decode", 1))  # (phase, batch) of the layer table, one marker each


def accuracy_vs_speed(cells: dict, layer_tables: dict[str, list[dict]], out_dir: Path,
                      model: str = MAIN_MODEL, palette: dict[str, str] | None = None) -> list[tuple[Path, str]]:
    """Per device with a layer table: each variant's speedup over bf16 (a LLaMA-2-7B decoder layer, Triton INT4
    backend) against the PPL of the same method and scheme on ``model``; (PNG, caption) pairs. Colour = method,
    marker = phase; each point labelled once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = palette or colors([r for rs in cells.values() for r in rs])
    made = []
    for device, rows in layer_tables.items():
        points = []
        for phase, batch in SPEED_CASES:
            for r in rows:
                cell = LAYER_VARIANTS.get(str(r.get("variant")))
                if r.get("phase") == phase and r.get("batch") == batch and cell in cells:
                    for x in cells[cell]:
                        points.append((phase, batch, r["variant"], float(r["speedup vs bf16"]), x["value"], cell[0]))
        if not points:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.8))
        labelled = set()
        for (phase, batch), marker in zip(SPEED_CASES, "os"):
            pts = [p for p in points if p[:2] == (phase, batch)]
            ax.scatter([p[3] for p in pts], [p[4] for p in pts], marker=marker, c=[palette[p[5]] for p in pts],
                       edgecolors="k", linewidths=0.5, label=f"{phase}, batch {batch}")
            for p in pts:
                where = (round(p[3], 3), round(p[4], 3))
                if where not in labelled:  # one label per point drawn (bf16 is 1.0x in every phase)
                    labelled.add(where)
                    ax.annotate(p[2], (p[3], p[4]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.axvline(1.0, color="k", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel(f"speedup over bf16: LLaMA-2-7B decoder layer on {device}")
        ax.set_ylabel(f"{model} perplexity (log; lower is better)")
        ax.set_title(f"Accuracy against speed ({device}; right and low is better)", fontsize=9)
        from matplotlib.lines import Line2D

        ax.legend(handles=[Line2D([], [], marker=m, ls="none", color="0.6", markeredgecolor="k", label=f"{ph}, batch {b}")
                           for (ph, b), m in zip(SPEED_CASES, "os")], fontsize=7, loc="upper center")
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


def revisions(records: list[dict]) -> tuple[Counter, list[str]]:
    """(records per quantbench code revision, a warning per problem: several revisions, dirty trees)."""
    revs = Counter((r.get("versions") or {}).get("quantbench") or "unknown" for r in records)
    warn = []
    if len(revs) > 1:
        warn.append(f"these {len(records)} records come from {len(revs)} code revisions ("
                    + ", ".join(f"{v}: {n}" for v, n in revs.most_common()) + "); compare within one revision")
    dirty = [v for v in revs if v.endswith(".dirty")]
    if dirty:
        warn.append(f"{sum(revs[v] for v in dirty)} records come from a dirty tree (uncommitted code: "
                    f"{', '.join(dirty)}); they cannot be reproduced from a revision")
    return revs, warn


def render(records: list[dict], out_path: Path, results_dir: str = "reports/results",
           speed_dir: Path | None = None) -> str:
    return build(records, out_path, results_dir, speed_dir)["markdown"]


def build(records: list[dict], out_path: Path, results_dir: str = "reports/results",
          speed_dir: Path | None = None) -> dict:
    """The page's parts: ``markdown`` (README.md), ``html`` (index.html), ``plots`` (paths), ``warnings``."""
    palette = colors(records)
    layer = read_tables("layer", speed_dir)
    plot_dir = out_path.parent / "plots"
    _, warnings = revisions(records)
    out = ["# quantbench results", "",
           f"Generated by `quantbench site {results_dir} -o {out_path}` from the result records; each number's "
           f"record (config hash, seed, versions, device) is in `{results_dir}/`, `index.html` beside this page has "
           "the same tables sortable with every number's provenance, and the leaderboard has every table in full.",
           ""]
    out += [f"> **Warning:** {w}." for w in warnings] + ([""] if warnings else [])
    made, speed, matrices = [], [], []
    pairs = sections(records) or [(MAIN_MODEL, MAIN_PROTOCOL)]
    for k, (model, protocol) in enumerate(pairs):
        headers, rows, cells = matrix(records, model, protocol)
        matrices.append((model, protocol, headers, rows, cells, ties(records, model, protocol)))
        fp = cells.get(("fp16", "w16a16"))
        out += [f"## {model}: every method x scheme (PPL, `{protocol}`)", "",
                f"FP16 reference: {leaderboard._fmt(fp[0]['value']) if fp else 'not run'}. "
                "`±` = the larger side of the 95 % bootstrap interval (the leaderboard has the intervals, and the paired "
                "ones of each difference to FP16). `·` = not run; `n/a` = weight-only, outside the reference scope of a method that exists to quantize "
                "activations (SmoothQuant, DuQuant: `Method.weight_only`; it would run if asked). A cell with "
                "several values: several records of the cell (other method options or calibration; see the "
                "leaderboard). The W4A16/W3A16 columns are per-channel weights; grouped ones are among the other "
                "columns.", "", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), ""]
        tied = matrices[-1][5]
        if tied:
            out += ["Within noise (the paired 95 % interval of the difference contains 0): " + "; ".join(tied) + ".",
                    ""]
        if cells:
            tag = "" if k == 0 else f"-{k}"
            figs = plots(cells, plot_dir, model, protocol, palette, tag)
            made += figs
            out += [f"![{p.stem}](plots/{p.name})" for p in figs] + ([""] if figs else [])
            if model == MAIN_MODEL and not speed:  # the speed tables pair with the offline model's accuracy
                speed = accuracy_vs_speed(cells, layer, plot_dir, model, palette)
    for path, caption in speed:
        out += [f"![{path.stem}](plots/{path.name})", "", caption, ""]
    if not speed:
        out += [f"No accuracy-vs-speed plot: it pairs {MAIN_MODEL}'s accuracy with the layer speed tables "
                "(`bash bench/gpu.sh` on a GPU writes `reports/layer-<device>.md`).", ""]
    fam = [r for r in leaderboard.latest(records) if (r.get("task_config") or {}).get("family") in leaderboard.FAMILIES]
    for model in sorted({r["model"] for r in fam}):
        out += [f"## {model}: lm-eval tasks", "", *leaderboard.family_tables([r for r in fam if r["model"] == model])]
    out += ["## The papers' numbers beside ours (real models: a GPU and the hub)", ""]
    out += leaderboard.paper_tables(records)
    out += cost_table(records, layer)
    out += ["Paper-internal inconsistencies, not used as targets: " + "; ".join(f"{w} — {y}" for w, y in INCONSISTENT)
            + ".", "", "## Reproduction cards", "",
            "Run `pytest bench/ <command>` on a GPU machine with the hub; expect each value within the tolerance. "
            "The settings column names where each knob comes from.", ""]
    rows = [[c.method, c.model, c.scheme, ", ".join(f"{t} {v}" for t, v in c.expect.items()) or "settings only",
             f"±{100 * c.rel_tol:g}%" if c.expect else "",
             c.source, "; ".join(f"{k}: {v}" for k, v in c.settings.items()) + (f" — {c.notes}" if c.notes else ""),
             f"`{c.command}`"] for c in CARDS]
    out += [tabulate(rows, headers=["method", "model", "scheme", "expect", "tol", "source", "settings", "command"],
                     tablefmt="github", disable_numparse=True), ""]
    out += ["## Provenance", "", leaderboard._provenance(leaderboard.latest(records)), ""]
    page = html.page(records, matrices, [*made, *(p for p, _ in speed)], warnings, palette, results_dir)
    return {"markdown": "\n".join(out), "html": page, "plots": [*made, *(p for p, _ in speed)], "warnings": warnings}


def main(argv: list[str] | None = None) -> int:
    args, records = leaderboard.read_args(__doc__, argv, "the markdown page (default: RESULTS_DIR/../README.md); "
                                          "index.html and plots/ go beside it")
    if records is None:
        return 1
    out = Path(args.output) if args.output else Path(args.results_dir).resolve().parent / "README.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = build(records, out, args.results_dir)
    for w in parts["warnings"]:
        print(f"quantbench site: warning: {w}", file=sys.stderr)
    for path, text in ((out, parts["markdown"]), (out.parent / "index.html", parts["html"])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {out}, {out.parent / 'index.html'} and {len(parts['plots'])} plots in {out.parent / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
