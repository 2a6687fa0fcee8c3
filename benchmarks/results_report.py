"""Combine the rows of several ``fedtune compare`` folders (e.g. one per seed) into one report.

Used for docs/results.md: the seed-0 grid and the seed-1 re-run are separate folders; this writes
their rows together (``results.csv``), the table averaged over seeds with the min–max spread
(``results.md``) and the two plots, into ``--out``::

    python benchmarks/results_report.py runs/sst2_seed0 runs/sst2_seed1 --out docs/results
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.io import atomic_write_json, atomic_write_text, read_json
from fedtune.simulations.compare_report import (
    format_results_table,
    plot_accuracy_vs_epsilon,
    plot_epsilon_spread,
    write_results_csv,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grids", nargs="+", help="fedtune compare output folders")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="SST-2, all-MiniLM-L6-v2 + LoRA")
    args = parser.parse_args(argv)
    rows, grids = [], []
    for folder in args.grids:
        data = read_json(Path(folder) / "results.json")
        grids.append({"folder": folder, "grid": data["grid"]})
        rows += data["rows"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"grids": grids, "rows": rows})
    write_results_csv(out / "results.csv", rows)
    atomic_write_text(out / "results.md", format_results_table(rows))
    plot_accuracy_vs_epsilon(out / "accuracy_vs_epsilon.png", rows, title=args.title)
    plot_epsilon_spread(out / "epsilon_spread.png", rows, title=args.title)
    print(format_results_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
