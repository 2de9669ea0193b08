"""``quantbench`` command: small helpers around the pytest bench driver.

    quantbench leaderboard RESULTS_DIR [-o FILE]   markdown leaderboard of a results directory
    quantbench models                               the model zoo, built-ins and what each resolves to
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["leaderboard"]:
        from quantbench.reports.leaderboard import main as leaderboard

        return leaderboard(argv[1:])
    if argv[:1] == ["models"]:
        from quantbench.models import BUILTIN, ZOO

        for name in BUILTIN:
            print(f"{name:14s} built-in (offline)")
        for name, hf_id in ZOO.items():
            print(f"{name:14s} {hf_id}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
