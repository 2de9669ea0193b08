"""``quantbench`` command: small helpers around the pytest bench driver.

    quantbench leaderboard RESULTS_DIR [-o FILE]   markdown leaderboard of a results directory
    quantbench site RESULTS_DIR [-o FILE]          the overview page (reports/README.md) and its plots
    quantbench regress [--update] [-k ID]          the accuracy regression check against committed baselines
    quantbench models                               the model zoo, built-ins and what each resolves to
    quantbench cache [list|clean] [KIND]            the content-keyed cache ($QUANTBENCH_CACHE): list or delete
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["leaderboard"]:
        from quantbench.reports.leaderboard import main as leaderboard

        return leaderboard(argv[1:])
    if argv[:1] == ["site"]:
        from quantbench.reports.site import main as site

        return site(argv[1:])
    if argv[:1] == ["regress"]:
        from quantbench.reports.regress import main as regress

        return regress(argv[1:])
    if argv[:1] == ["cache"]:
        return _cache(argv[1:])
    if argv[:1] == ["models"]:
        from quantbench.models import BUILTIN, ZOO

        for name in BUILTIN:
            print(f"{name:14s} built-in (offline)")
        for name, hf_id in ZOO.items():
            print(f"{name:14s} {hf_id}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


def _cache(args: list[str]) -> int:
    from quantbench import cache

    verb = args[0] if args else "list"
    kind = args[1] if len(args) > 1 else None
    if verb not in ("list", "clean") or len(args) > 2:
        print("usage: quantbench cache [list|clean] [KIND]", file=sys.stderr)
        return 2
    if verb == "clean":
        n, size = cache.clean(kind)
        print(f"removed {n} files ({size / 2**20:.1f} MiB) from {cache.cache_dir()}{'/' + kind if kind else ''}")
        return 0
    for p in cache.entries(kind):
        print(f"{p.stat().st_size / 2**20:9.1f} MiB  {p.relative_to(cache.cache_dir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
