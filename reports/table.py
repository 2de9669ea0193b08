"""``quantbench results RESULTS_DIR [--csv FILE] [--columns a,b]``: the records as a table or as CSV
(:func:`quantbench.load_results`: one row per record, the columns a user filters on first)."""
from __future__ import annotations

import json
import sys

from tabulate import tabulate

from quantbench.api import FIRST_COLUMNS, load_results
from quantbench.errors import ConfigError

SHOWN = ("model", "method", "scheme", "task", "metric", "value", "protocol", "calibration", "config_hash", "revision")


def main(args) -> int:
    try:
        df = load_results(args.results_dir)
    except ConfigError as e:
        print(f"quantbench results: {e}", file=sys.stderr)
        return 4
    if df.empty:
        print(f"no result records in {args.results_dir}", file=sys.stderr)
        return 1
    cols = [c.strip() for c in args.columns.split(",")] if args.columns else None
    unknown = [c for c in cols or () if c not in df.columns]
    if unknown:
        print(f"quantbench results: no column {', '.join(unknown)}; first columns: {', '.join(FIRST_COLUMNS)}",
              file=sys.stderr)
        return 4
    if args.csv:
        out = df[cols] if cols else df
        out = out.map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
        out.to_csv(sys.stdout if args.csv == "-" else args.csv, index=False)
        if args.csv != "-":
            print(f"wrote {len(out)} records to {args.csv}", file=sys.stderr)
        return 0
    print(tabulate(df[cols or list(SHOWN)].values.tolist(), headers=cols or list(SHOWN), tablefmt="github",
                   disable_numparse=True, floatfmt=".4g"))
    return 0
