"""``quantbench`` command line (argparse).

    quantbench run [options]                       quantize and evaluate: the options of ``pytest bench/``
    quantbench leaderboard RESULTS_DIR [-o FILE]   markdown leaderboard of a results directory
    quantbench site RESULTS_DIR [-o FILE]          the overview page (README.md + index.html) and its plots
    quantbench results RESULTS_DIR [--csv FILE]    the records as a table (pandas), or as CSV
    quantbench regress [--update] [-k ID]          the accuracy regression check against committed baselines
    quantbench export RECORD -o DIR                a record's quantized model as a compressed-tensors checkpoint
    quantbench models                              the model zoo, built-ins and what each resolves to
    quantbench cache [list|clean] [KIND]           the content-keyed cache ($QUANTBENCH_CACHE): list or delete

``--help`` answers without loading torch. Bad input: one line on stderr, exit 4, before any work.
"""
from __future__ import annotations

import logging
import sys

from quantbench.errors import QuantbenchError
from quantbench.options import EXIT_USAGE, ArgumentParser, add_options, did_you_mean

COMMANDS = {
    "run": "quantize and evaluate (method x scheme grid on one model; the options of `pytest bench/`)",
    "leaderboard": "markdown leaderboard of a results directory",
    "site": "overview page of a results directory: README.md, index.html (sortable, provenance) and plots",
    "results": "the records of a results directory as a table, or CSV",
    "regress": "accuracy regression check against the committed baselines",
    "export": "write a record's quantized model as a compressed-tensors checkpoint (transformers, vLLM)",
    "models": "the model zoo and built-ins",
    "cache": "list or delete the content-keyed cache ($QUANTBENCH_CACHE)",
}
PYTEST_ONLY = {"--speed"}  # pytest-benchmark cases exist only under pytest bench/


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="quantbench", description="Benchmark and reproducibility suite for low-bit "
                        "post-training quantization of LLMs.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    run = sub.add_parser("run", help=COMMANDS["run"], description=COMMANDS["run"] + ". Example: quantbench run "
                         "--method duquant --model mistral-7b --scheme w4a4 --tasks ppl")
    add_options(lambda flag, **kw: None if flag in PYTEST_ONLY else run.add_argument(flag, **kw))
    run.add_argument("-j", "--jobs", type=int, default=1, help="run cases in N worker processes, each with its share "
                     "of the cores (default 1; pytest bench/ -n N does the same)")
    run.add_argument("-q", "--quiet", action="store_true", help="warnings only (default: progress logs)")
    for name in ("leaderboard", "site", "results"):
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        p.add_argument("results_dir", metavar="RESULTS_DIR")
        if name == "results":
            p.add_argument("--csv", default=None, metavar="FILE", help="write CSV here ('-': stdout) instead of a "
                           "table; nested fields as JSON")
            p.add_argument("--columns", default=None, help="comma list of columns (default: the first ones)")
        else:
            p.add_argument("-o", "--output", default=None, metavar="FILE", help="default: stdout" if
                           name == "leaderboard" else "the markdown page (default: RESULTS_DIR/../README.md); "
                           "index.html and plots/ go beside it")
    reg = sub.add_parser("regress", help=COMMANDS["regress"], description=COMMANDS["regress"])
    reg.add_argument("--update", action="store_true", help="write the values of this run as the new baselines")
    reg.add_argument("-k", default="", help="only checks whose id contains this")
    reg.add_argument("--results-dir", default=None, help="keep the run's records here (default: a temp dir)")
    exp = sub.add_parser("export", help=COMMANDS["export"], description=COMMANDS["export"] + ". The plan is taken from "
                         "the cache when the record's run left it there, else calibrated again with the record's "
                         "settings; it must reproduce the record's run id. Example: quantbench export "
                         "reports/results/<hash>-ppl.json -o smollm2-gptq-w4a16")
    exp.add_argument("record", metavar="RECORD", help="a result record (.json), or a config hash (prefix) in "
                     "--results-dir")
    exp.add_argument("-o", "--output", required=True, metavar="DIR", help="the checkpoint folder to write")
    exp.add_argument("--format", default="compressed-tensors", help="compressed-tensors (the only one)")
    exp.add_argument("--results-dir", default="reports/results", help="where a config hash is looked up")
    exp.add_argument("--device", default="cpu", help="where to calibrate if the plan is not cached (default cpu)")
    exp.add_argument("--allow-activation-grid", action="store_true", help="export activations measured on a grid "
                     "other than sym_ct (the checkpoint then quantizes them on sym_ct; the provenance says so)")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    sub.add_parser("models", help=COMMANDS["models"], description=COMMANDS["models"])
    cache = sub.add_parser("cache", help=COMMANDS["cache"], description=COMMANDS["cache"])
    cache.add_argument("verb", nargs="?", default="list", choices=["list", "clean"])
    cache.add_argument("kind", nargs="?", default=None, help="one kind of entry (plans, stats, windows, ...)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        ap.error(f"unknown command {argv[0]!r}{did_you_mean(argv[0], COMMANDS)}; commands: {', '.join(COMMANDS)}")
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    return globals()["_" + args.command](args)


def _run(args) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from quantbench.cases import run_cases

    return run_cases(args)


def _leaderboard(args) -> int:
    from quantbench.reports.leaderboard import main as leaderboard

    return leaderboard([args.results_dir, *(["-o", args.output] if args.output else [])])


def _site(args) -> int:
    from quantbench.reports.site import main as site

    return site([args.results_dir, *(["-o", args.output] if args.output else [])])


def _results(args) -> int:
    from quantbench.reports.table import main as table

    return table(args)


def _regress(args) -> int:
    from quantbench.reports.regress import main as regress

    return regress([*(["--update"] if args.update else []), *(["-k", args.k] if args.k else []),
                    *(["--results-dir", args.results_dir] if args.results_dir else [])])


def _export(args) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    from quantbench import export
    from quantbench.api import _record, from_record

    try:
        if args.format not in export.FORMATS:
            raise QuantbenchError(f"unknown export format {args.format!r}; formats: {', '.join(export.FORMATS)}")
        export._ct()
        rec = _record(args.record, args.results_dir)
        why = export.scheme_refusals(rec["scheme_spec"], args.allow_activation_grid)  # before any work
        if why:
            raise QuantbenchError(f"cannot export {rec['method']} {rec['scheme']} as {args.format}: " + "; ".join(why))
        qm = from_record(rec, device=args.device)
        out = qm.save_pretrained(args.output, format=args.format, allow_activation_grid=args.allow_activation_grid,
                                 overwrite=args.overwrite)
    except QuantbenchError as e:
        print(f"quantbench export: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out} ({qm.info['method']} {qm.info['scheme']}, run {qm.info['config_hash']}): load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) or `quantbench run --method load "
          f"--model {out}`")
    return 0


def _models(args) -> int:
    from quantbench.models import BUILTIN, ZOO

    for name in BUILTIN:
        print(f"{name:14s} built-in (offline)")
    for name, hf_id in ZOO.items():
        print(f"{name:14s} {hf_id}")
    return 0


def _cache(args) -> int:
    from quantbench import cache

    if args.verb == "clean":
        n, size = cache.clean(args.kind)
        print(f"removed {n} files ({size / 2**20:.1f} MiB) from {cache.cache_dir()}"
              f"{'/' + args.kind if args.kind else ''}")
        return 0
    for p in cache.entries(args.kind):
        print(f"{p.stat().st_size / 2**20:9.1f} MiB  {p.relative_to(cache.cache_dir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
