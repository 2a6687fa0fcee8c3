"""Copy the finished cells of ``fedtune compare`` grids into the repository (issue 11).

A full-scale grid takes more than one sitting. Its finished cells are small (``summary.json``,
``metrics.csv``, ``config.json``, ``plot.png``): keeping them in ``docs/results/grid/<grid>/`` keeps
the measurement with the code, and copying such a folder back to ``runs/`` lets
``fedtune compare --resume`` skip those cells (a cell whose ``summary.json`` says finished)::

    python benchmarks/keep_cells.py runs/grid/sst2-eps8inf-seed0 --out docs/results/grid
    cp -r docs/results/grid/sst2-eps8inf-seed0 runs/grid/ && fedtune compare --resume runs/grid/sst2-eps8inf-seed0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

KEEP = ("summary.json", "metrics.csv", "config.json", "plot.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grids", nargs="+", type=Path, help="fedtune compare output folders")
    p.add_argument("--out", type=Path, default=Path("docs/results/grid"))
    args = p.parse_args(argv)
    for grid in args.grids:
        target = args.out / grid.name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("grid.json", "results.json", "results.csv", "results.md"):
            if (grid / name).exists():
                shutil.copy2(grid / name, target / name)
        kept = 0
        for cell in sorted((grid / "cells").glob("*")):
            summary = cell / "summary.json"
            if not summary.exists() or not json.loads(summary.read_text()).get("finished", False):
                continue  # unfinished: it resumes from its own checkpoint in runs/, not from here
            (target / "cells" / cell.name).mkdir(parents=True, exist_ok=True)
            for name in KEEP:
                if (cell / name).exists():
                    shutil.copy2(cell / name, target / "cells" / cell.name / name)
            kept += 1
        print(f"{grid}: {kept} finished cell(s) kept in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
