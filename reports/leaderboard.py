"""Markdown leaderboard from a results directory: per model, one table per task family for the lm-eval tasks
(QA, MMLU, LongBench: one column per task or category, with averages) and one table per (task protocol, metric)
for the rest; the fp16 row first and a delta column against it. A pure function of the records.

    python -m quantbench.reports.leaderboard RESULTS_DIR [-o reports/leaderboard.md]
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from tabulate import tabulate

from quantbench import uncertainty
from quantbench.errors import ConfigError
from quantbench.pipeline import resolve
from quantbench.plugins import load_plugins  # noqa: F401  (registers the methods that records name)
from quantbench.reports.papers import paper_values
from quantbench.results import ResultStore
from quantbench.tasks.lmeval import DUQUANT_QA6, LONGBENCH, LONGBENCH_SUBSETS, MMLU_CATEGORIES, QA, QA_SHOWN

LOWER_IS_BETTER = {"ppl"}


def latest(records: list[dict]) -> list[dict]:
    """One record per (config_hash, metric): the most recent."""
    best: dict[tuple, dict] = {}
    for r in records:
        key = (r["config_hash"], r["metric"])
        if key not in best or r.get("created", "") >= best[key].get("created", ""):
            best[key] = r
    return list(best.values())


def _bits(spec: dict | None) -> int:
    return spec["bits"] if spec else 16


def _row_key(r: dict):
    s = r.get("scheme_spec") or {}
    return (r["method"] != "fp16", r["method"], -_bits(s.get("w")), -_bits(s.get("a")), r["scheme"], r["backend"])


def _fmt(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 1e4 else f"{x:.4g}"


def ci(r: dict) -> str:
    """The record's 95 % interval as ``[lo, hi]`` (empty without one)."""
    c = (r.get("interval") or {}).get("ci95")
    return f"[{_fmt(c[0])}, {_fmt(c[1])}]" if c else ""


def plus_minus(r: dict) -> str:
    """``value ±h``: h the larger side of the 95 % interval (the value alone without one)."""
    c = (r.get("interval") or {}).get("ci95")
    if not c:
        return _fmt(r["value"])
    return f"{_fmt(r['value'])} ±{_fmt(max(c[1] - r['value'], r['value'] - c[0]))}"


TIE = "≈"  # marks a difference whose 95 % interval contains 0


def delta(r: dict, base: dict | None) -> dict | None:
    """``r - base`` with its 95 % interval: paired (bootstrap over the items both were evaluated on) when both kept
    their items, else from the two standard errors (independent: wider); ``tie`` when the interval contains 0."""
    if base is None or r is base:
        return None
    d = uncertainty.paired(r["items"], base["items"]) if r.get("items") and base.get("items") else None
    if d is not None:
        return {**d, "how": "paired"}
    out = {"delta": r["value"] - base["value"], "ci95": None, "tie": None, "how": "unpaired"}
    se = [(x.get("interval") or {}).get("stderr") for x in (r, base)]
    if all(v is not None for v in se):
        h = uncertainty.Z95 * (se[0] ** 2 + se[1] ** 2) ** 0.5
        out.update(ci95=[out["delta"] - h, out["delta"] + h], tie=abs(out["delta"]) <= h)
    return out


def delta_text(d: dict | None) -> str:
    """``+6.71 [+5.20, +8.40]``, with :data:`TIE` when the interval contains 0."""
    if d is None:
        return ""
    text = f"{d['delta']:+.2f}"
    if d["ci95"]:
        text += f" [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
        if d["how"] == "unpaired":
            text += " unpaired"
    return text + (f" {TIE}" if d["tie"] else "")


def table(group: list[dict]) -> str:
    metric = group[0]["metric"]
    base = next((r for r in group if r["method"] == "fp16"), None)
    rows = []
    for r in sorted(group, key=_row_key):
        rows.append([_method(r), r["scheme"], _desc(r), _fmt(r["value"]), ci(r), delta_text(delta(r, base)),
                     _calib(r), _quant_time(r), r["backend"], r["config_hash"]])
    rows += seed_spread_rows(group)
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    headers = ["method", "scheme", "quantizers", f"{metric} ({better} is better)", "95 % CI",
               f"Δ vs fp16 [95 % CI] ({TIE}: within noise)", "calibration", "quantize", "backend", "config"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def seed_spread_rows(group: list[dict]) -> list[list[str]]:
    """One row per configuration run under several calibration seeds (``--calib-seeds``; records equal but for the
    seed): the mean ± sample standard deviation over the seeds, their range, and the seeds."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in group:
        c = r.get("calibration")
        if c:
            rest = {k: v for k, v in c.items() if k not in ("seed", "windows_sha256")}
            by[repr((r["method"], r["scheme"], r["backend"], sorted((r.get("method_options") or {}).items()),
                     sorted(rest.items())))].append(r)
    rows = []
    for recs in by.values():
        seeds = sorted({r["calibration"]["seed"] for r in recs})
        if len(seeds) < 2:
            continue
        s = uncertainty.spread([r["value"] for r in recs])
        r = recs[0]
        rows.append([f"{_method(r)} · {len(seeds)} calibration seeds", r["scheme"], _desc(r),
                     f"{_fmt(s['mean'])} ± {_fmt(s['std'])} (sd)", f"range [{_fmt(s['min'])}, {_fmt(s['max'])}]", "",
                     f"{_calib(r).rsplit(' s', 1)[0]} seeds {','.join(map(str, seeds))}", "", r["backend"], ""])
    return rows


def row_name(r: dict) -> str:
    """The row a record belongs to: its method, or for an imported checkpoint (``load``) its ``label`` (e.g.
    ``llm-compressor:gptq``) when it has one."""
    label = (r.get("method_options") or {}).get("label") if r["method"] == "load" else None
    return label or r["method"]


def _method(r: dict) -> str:
    """Method name plus the options that differ from the method's registered defaults (an imported checkpoint:
    its row name)."""
    if row_name(r) != r["method"]:
        return row_name(r)
    opts = r.get("method_options") or {}
    try:  # pipelines ("gptq+normtweak") are built by name; a method no longer registered shows every option
        defaults = resolve(r["method"]).options
    except ConfigError:
        defaults = {}
    diff = [f"{k}={v}" for k, v in opts.items() if defaults.get(k, object()) != v]
    return r["method"] + (f" ({', '.join(diff)})" if diff else "")


def _calib(r: dict) -> str:
    c = r.get("calibration")
    return f"{c['corpus']} {c['nsamples']}×{c['seqlen']} s{c['seed']}" if c else ""


def _quant_time(r: dict) -> str:
    """Quantization wall time; a plan read from the cache says so (its time is the load, not the calibration)."""
    cached = str(r.get("plan_source", "")).startswith("cache")
    return f"{_secs(r.get('quant_wall_s'))} (cached plan)" if cached else _secs(r.get("quant_wall_s"))


def _secs(s) -> str:
    if s is None:
        return ""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _desc(r: dict) -> str:
    """Short quantizer description, e.g. ``W sym/channel · A sym/token`` (what "W4A4" means here)."""
    s = r.get("scheme_spec") or {}
    parts = []
    for t in "waqkv":
        spec = s.get(t)
        if spec:
            g = f"g{spec['group_size']}" if spec["group_size"] else spec["granularity"]
            clip = f" clip{spec['clip_ratio']}" if spec["clip_ratio"] != 1.0 else ""
            grid = "stored" if t == "w" and r.get("method") == "load" else spec["grid"]  # a checkpoint's own scales
            parts.append(f"{t.upper()}{spec['bits']} {grid}/{g}{clip}")
    return " · ".join(parts) or "fp"


def render(records: list[dict], title: str = "quantbench leaderboard") -> str:
    records = latest(records)
    family = [r for r in records if (r.get("task_config") or {}).get("family") in FAMILIES]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if (r.get("task_config") or {}).get("family") not in FAMILIES:
            groups[(r["model"], r["protocol"], r["metric"])].append(r)
    out = [f"# {title}", "",
           "Generated by `python -m quantbench.reports.leaderboard` from result records; every number is "
           "reproducible from its `config` hash (see the record's JSON for seed, versions and device).", ""]
    for model in sorted({r["model"] for r in records}):
        out += [f"## {model}", ""]
        any_rec = next(r for r in records if r["model"] == model)
        out += [f"Model: `{any_rec['model_id']}` (revision `{any_rec['model_revision']}`, "
                f"dtype {any_rec.get('dtype', '?')})."]
        if any_rec.get("model_notes"):
            out += ["", f"> Note: {any_rec['model_notes']}"]
        out.append("")
        out += family_tables([r for r in family if r["model"] == model])
        for key in sorted(k for k in groups if k[0] == model):
            out += [f"### `{key[1]}` — {key[2]}", "", table(groups[key]), ""]
        out += paper_tables(records, [model])
    out += ["## Provenance", "", _provenance(records), ""]
    return "\n".join(out)


def summary(records: list[dict]) -> str:
    """What ``quantbench run`` prints: the tables of these records only (no page title, notes or provenance)."""
    records = latest(records)
    out = []
    for model in sorted({r["model"] for r in records}):
        mine = [r for r in records if r["model"] == model]
        out += family_tables([r for r in mine if (r.get("task_config") or {}).get("family") in FAMILIES])
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in mine:
            if (r.get("task_config") or {}).get("family") not in FAMILIES:
                groups[(r["protocol"], r["metric"])].append(r)
        for (protocol, metric), group in sorted(groups.items()):
            out += [f"{model} · {protocol} · {metric}", "", table(group), ""]
    return "\n".join(out)


def paper_tables(records: list[dict], models: list[str] | None = None) -> list[str]:
    """Per model with paper numbers (:mod:`quantbench.reports.papers`): one row per (method, scheme, paper table),
    each task's paper value beside our latest record of the same (model, method, scheme, task, metric). A record
    measured under another protocol is shown marked ``≠`` (its label in the footnote), never compared; one with
    non-default method options is marked ``*``."""

    records = latest(records)
    out = []
    for model in (models if models is not None else sorted({v.model for v in paper_values()})):
        vals = paper_values(model)
        if not vals:
            continue
        tasks = list(dict.fromkeys((v.task, v.metric) for v in vals))
        rows: dict[tuple, dict] = {}
        notes: list[str] = []
        for v in vals:
            row = rows.setdefault((v.method, v.scheme, f"{v.source} · {v.setting}" if v.setting else v.source), {})
            mine = sorted((r for r in records if (r["model"], r["method"], r["scheme"], r["task"], r["metric"])
                           == v.key), key=lambda r: (r["protocol"] != v.protocol, bool(r.get("method_options"))))
            ours = ""
            if mine:
                r = mine[0]
                ours = _fmt(r["value"])
                spec = r.get("scheme_spec") or {}
                grids = [(t, g) for t, g in v.grids if (spec.get(t) or {}).get("grid") != g]
                if r["protocol"] != v.protocol or grids:
                    why = f"ours `{r['protocol']}`, paper `{v.protocol}`" if r["protocol"] != v.protocol else \
                        "paper grids " + ", ".join(f"{t}={g}" for t, g in grids)
                    notes.append(f"≠ {v.method} {v.scheme} {v.task}: {why}")
                    ours += " ≠"
                else:
                    ours += f" ({r['value'] - v.value:+.2f})"
                if r.get("method_options"):
                    ours += " *"
            row[(v.task, v.metric)] = (_fmt(v.value), ours)
        table_rows = []
        for (method, scheme, source), cells in rows.items():
            vals_ = [x for t in tasks for x in cells.get(t, ("", ""))]
            table_rows.append([method, scheme, *vals_, source])
        headers = ["method", "scheme"] + [f"{t} {m} {who}" for t, m in tasks for who in ("paper", "ours")] + ["source"]
        out += [f"### Papers' numbers beside ours — {model}", "",
                "*ours*: the latest record of the same method, scheme, task and metric, with (ours − paper); "
                "`≠` = measured under another protocol (not compared), `*` = non-default method options. Empty: "
                "not run yet — these models need a GPU and the hub; the reproduction cards "
                "(`quantbench/reports/papers.py`) give the exact commands. Accuracy averages (`avg`) are the "
                "papers' alone so far (their harness differs from the pinned lm-eval).", "",
                tabulate(table_rows, headers=headers, tablefmt="github", disable_numparse=True), ""]
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
    return out


# lm-eval task families: columns, shown metric and averages (values x100, as the papers print them)
FAMILIES = ("qa", "mmlu", "longbench")


def _shown(family: str, recs: dict[str, float], task: str) -> tuple[str, float] | None:
    """(metric, value) a cell shows: QA acc_norm where the task has it else acc (QuaRot), MMLU acc, LongBench score."""
    for m in (("acc_norm", "acc") if family == "qa" else ("acc",) if family == "mmlu" else ("score",)):
        if m in recs:
            return m, recs[m]
    return None


def _columns(family: str, suite: str, cells: dict) -> list[str]:

    present = {c for row in cells.values() for c in row}
    if family == "mmlu":
        order = [f"acc_{c}" for c in MMLU_CATEGORIES]
    elif family == "qa":
        order = [*QA, "austen-lastword"]
    else:
        order = [*LONGBENCH, *sorted((c for c in present if c.startswith("score_len")), key=lambda c: int(c[9:]))]
    return [c for c in order if c in present] + sorted(present - set(order) - {"acc", "score"})


def family_tables(records: list[dict]) -> list[str]:
    """One table per (family, suite, protocol settings): rows are runs, columns tasks (or MMLU categories)."""

    tables: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        c = r["task_config"]
        key = (FAMILIES.index(c["family"]), c["suite"], c.get("format", ""), c["harness"], c["num_fewshot"],
               c["add_bos"], c["limit"], c.get("truncate_to"))
        tables[key].append(r)
    out = []
    for key in sorted(tables, key=str):
        fam_i, suite, fmt, harness, shots, bos, limit, trunc = key
        family, recs = FAMILIES[fam_i], tables[key]
        runs: dict[str, dict] = {}
        cells: dict[str, dict[str, float]] = defaultdict(dict)
        for r in recs:
            runs.setdefault(r["run_id"], r)
            task = r["task_config"]["task"]
            if family == "mmlu" or task in ("passkey",):  # one record per category / length
                cells[r["run_id"]][r["metric"]] = r["value"]
                if r["metric"] in ("acc", "score"):
                    cells[r["run_id"]]["_avg"] = r["value"]
            else:
                cells[r["run_id"]].setdefault(f"_{task}", {})[r["metric"]] = r["value"]
        for run_id, row in cells.items():  # QA / LongBench: pick each task's shown metric
            for k in [k for k in row if k.startswith("_") and k != "_avg"]:
                shown = _shown(family, row.pop(k), k[1:])
                if shown:
                    row[k[1:]] = shown[1]
        cols = _columns(family, suite, {k: {c: 1 for c in v if not c.startswith("_")} for k, v in cells.items()})
        avgs = _averages(family, suite, cols)
        headers = ["method", "scheme", *[c.removeprefix("acc_").removeprefix("score_") for c in cols],
                   *[a for a, _ in avgs], "Δ vs fp16", "backend", "run"]
        base = next((cells[i] for i, r in runs.items() if r["method"] == "fp16"), None)
        rows = []
        for run_id, r in sorted(runs.items(), key=lambda kv: _row_key(kv[1])):
            row = cells[run_id]
            vals = [_pct(row.get(c)) for c in cols]
            avg_vals = [_avg(row, members) for _, members in avgs]
            first = avg_vals[0] if avg_vals else None
            base_avg = _avg(base, avgs[0][1]) if base and avgs else None
            delta = "" if r["method"] == "fp16" or first is None or base_avg is None else f"{100 * (first - base_avg):+.2f}"
            rows.append([_method(r), r["scheme"], *vals, *[_pct(a) for a in avg_vals], delta, r["backend"], run_id])
        title = {"qa": "Zero-shot QA", "mmlu": "MMLU", "longbench": "LongBench"}[family]
        where = "shipped offline tasks" if suite == "local" else "hub datasets"
        notes = [f"{harness}"] + ([f"{fmt} format"] if fmt else []) + [f"{shots}-shot", "BOS" if bos else "no BOS"] + ([f"first {limit} docs"] if limit else []) \
            + ([f"middle truncation to {trunc} tokens"] if trunc else [])
        out += [f"### {title} ({where}) — {', '.join(notes)}", ""]
        shown = {"qa": f"Cells: {QA_SHOWN}; x100.", "mmlu": "Cells: accuracy x100 per MMLU category; avg = micro "
                 "average over questions (lm-eval's weight_by_size).", "longbench": "Cells: LongBench score x100."}
        out += [shown[family] + " Averages are shown only when every member task of the row was run.", ""]
        if family == "qa" and suite == "hub":
            out += [f"`avg6` = {', '.join(DUQUANT_QA6)} (DuQuant/OmniQuant's six; their harness is the v0.3 fork, "
                    "whose numbers run lower than lm-eval 0.4 `acc_norm`: compare protocol with protocol).", ""]
        if family == "longbench" and suite == "hub":
            out += [f"`avg13` = DuQuant Tables D3/D4 ({', '.join(LONGBENCH_SUBSETS['duquant13'])}); `kivi8` = "
                    f"KIVI's set ({', '.join(LONGBENCH_SUBSETS['kivi8'])}), which DuQuant's Table 4 follows.", ""]
        out += [tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True), ""]
    return out


def _averages(family: str, suite: str, cols: list[str]) -> list[tuple[str, list[str]]]:

    if family == "mmlu" or (family == "longbench" and suite == "local"):
        return [("avg", ["_avg"])]
    if family == "qa":
        return [("avg", cols)] + ([("avg6", list(DUQUANT_QA6))] if suite == "hub" else [])
    return [("avg", cols), ("avg13", list(LONGBENCH_SUBSETS["duquant13"])),
            ("kivi8", list(LONGBENCH_SUBSETS["kivi8"]))]


def _avg(row: dict | None, members: list[str]) -> float | None:
    if not row or not members or any(m not in row for m in members):
        return None
    return sum(row[m] for m in members) / len(members)


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _provenance(records: list[dict]) -> str:
    rows = defaultdict(int)
    for r in records:
        v, d = r["versions"], r["device"]
        rows[(v.get("quantbench"), v.get("torch"), v.get("transformers"), d.get("kind"), d.get("name"))] += 1
    return tabulate([[*k, n] for k, n in sorted(rows.items(), key=str)],
                    headers=["quantbench", "torch", "transformers", "device", "device name", "records"],
                    tablefmt="github", disable_numparse=True)


def read_args(doc: str, argv: list[str] | None, output_help: str, output_default: str | None = None):
    """The report generators' shared command line: ``RESULTS_DIR [-o FILE]`` -> (args, records), records None
    (after saying so) when the directory holds none."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("results_dir")
    ap.add_argument("-o", "--output", default=output_default, help=output_help)
    args = ap.parse_args(argv)
    records = ResultStore(args.results_dir).records()
    if not records:
        print(f"no result records in {args.results_dir}", file=sys.stderr)
        return args, None
    return args, records


def main(argv: list[str] | None = None) -> int:
    args, records = read_args(__doc__, argv, "write the markdown here (default: stdout)")
    if records is None:
        return 1
    text = render(records)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
