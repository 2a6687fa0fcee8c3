"""How much of each client's update is shared signal, and how much is its own noise? (issue 11)

Reads a finished private federated run with the FedAvg server (``OUT/config.json``, the clients'
stored updates ``OUT/clients/client-*/updates/round-R.npz``), rebuilds the global model of every
round (the initial template, then the example-weighted mean of the clients' models), and for each
round ``r`` and client ``i`` takes the update :math:`\\Delta_i^r = w_i^r - g^{r-1}`. It reports

* ``client_norm``: mean :math:`\\lVert\\Delta_i^r\\rVert` over clients;
* ``mean_norm``: :math:`\\lVert\\frac1K\\sum_i \\Delta_i^r\\rVert`, the step the server takes;
* ``alignment = mean_norm / client_norm``: 1 when the clients move the same way, about
  :math:`1/\\sqrt K` when their updates are independent noise of equal size (0.354 for K = 8);
* ``cosine``: the mean pairwise cosine between the clients' updates (0 for independent noise).

That is the measurement behind docs/results.md's explanation of why federated DP collapsed with a
fresh local AdamW: Adam divides each coordinate by its own running RMS, which under DP is
the noise's, so every client's first steps are ``lr * sign(noise)``-like moves of full size in
every coordinate, independent across clients, that averaging only shrinks by :math:`\\sqrt K`.

Usage::

    python benchmarks/update_alignment.py runs/recipe/federated8-iid_optadamw... [more runs] \\
        --out benchmarks/results/update_alignment
    python benchmarks/update_alignment.py RUN --per-client --out ...   # one row per client and round
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _flat(state: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in keys])


def analyse(run: Path, *, per_client: bool = False) -> list[dict[str, Any]]:
    """Per-round alignment rows of one run; ``per_client``: one row per client and round instead.

    A client's row gives its FedAvg weight ``N_k / N``, its update norm, the cosine of its update
    with the weighted mean one (how much of the server's step is this client's), and how much it
    moved the head's bias towards the positive class (``bias[1] - bias[0]``, binary tasks).
    """
    from fedtune.config import RunConfig
    from fedtune.data.glue import get_task_spec
    from fedtune.model import get_trainable_state
    from fedtune.workload import build_template

    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    if config.server_optimizer != "fedavg" or not config.private:
        raise SystemExit(f"{run}: needs a private run with the fedavg server (got {config.server_optimizer})")
    template, _ = build_template(config, get_task_spec(config.task).num_labels)
    global_state = {k: v.detach().cpu().numpy() for k, v in get_trainable_state(template).items()}
    keys = sorted(global_state)
    clients = sorted((run / "clients").glob("client-*"))
    ledgers = {c.name: json.loads((c / "ledger.json").read_text()) for c in clients}
    label = f"{run.parent.parent.name}/{run.name}" if run.parent.name == "cells" else run.name  # a grid's cell
    rows = []
    for r in range(1, config.rounds + 1):
        updates, weights, names = [], [], []
        for c in clients:
            path = c / "updates" / f"round-{r}.npz"
            if not path.exists():
                continue
            with np.load(path) as data:
                updates.append({k: data[k] for k in data.files})
            names.append(c.name)
            weights.append(_examples(ledgers[c.name], r))
        if not updates:
            break
        g = _flat(global_state, keys)
        deltas = np.stack([_flat(u, keys) - g for u in updates])
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        mean = (w[:, None] * deltas).sum(axis=0)
        norms = np.linalg.norm(deltas, axis=1)
        unit = deltas / norms[:, None]
        cos = unit @ unit.T
        k = len(updates)
        if per_client:
            bias = next((key for key in keys if key.endswith("classifier.modules_to_save.default.bias")), None)
            for i, name in enumerate(names):
                shift = float("nan")
                if bias is not None and global_state[bias].shape == (2,):
                    b, b0 = updates[i][bias], global_state[bias]
                    shift = float((b[1] - b[0]) - (b0[1] - b0[0]))
                bound = _adam_bias_bound(config, ledgers[name], r)
                rows.append(
                    {
                        "run": label,
                        "round": r,
                        "client": name,
                        "weight": float(w[i]),
                        "norm": float(norms[i]),
                        "cosine_with_mean": float(deltas[i] @ mean / (norms[i] * np.linalg.norm(mean))),
                        "head_bias_shift": shift,
                        "head_bias_bound": bound,
                        "saturation": abs(shift) / bound if bound > 0 else float("nan"),
                    }
                )
        else:
            rows.append(
                {
                    "run": label,
                    "round": r,
                    "clients": k,
                    "client_norm": float(norms.mean()),
                    "mean_norm": float(np.linalg.norm(mean)),
                    "alignment": float(np.linalg.norm(mean) / norms.mean()),
                    "noise_only_alignment": float(1 / np.sqrt(k)),
                    "cosine": float((cos.sum() - k) / (k * (k - 1))) if k > 1 else float("nan"),
                }
            )
        new_global = {}
        for key in keys:
            new_global[key] = sum(wi * u[key] for wi, u in zip(w, updates, strict=True))
        global_state = new_global
    return rows


def _adam_bias_bound(config: Any, ledger: dict[str, Any], server_round: int) -> float:
    """Largest ``|shift of bias[1] - bias[0]|`` an Adam-family client can make in a round: ``2 sum_t lr_t``.

    Adam moves a coordinate by at most about ``lr_t`` per step (``|m / sqrt(v)| <= 1`` for a
    steady gradient), so a shift near this bound means the client's head bias moved at full speed
    in the sign of its own label majority: Adam's sign regime. NaN for SGD.
    """
    from fedtune.client.job import optimizer_settings
    from fedtune.train import TrainConfig

    if config.optimizer == "sgd":
        return float("nan")
    event = next((e for e in ledger.get("entries", []) if int(e.get("round", -1)) == server_round), None)
    if event is None:
        return float("nan")
    steps, examples = int(event["steps"]), int(event["examples"])
    settings = optimizer_settings(config, steps, server_round, config.client_batch_size(examples))
    train = TrainConfig(batch_size=config.client_batch_size(examples), steps=steps, **settings)
    return 2.0 * sum(train.lr_at(t) for t in range(1, steps + 1))


def _examples(ledger: dict[str, Any], server_round: int) -> int:
    for event in ledger.get("entries", []):
        if int(event.get("round", -1)) == server_round:
            return int(event.get("examples", 1))
    return 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", default="benchmarks/results/update_alignment")
    p.add_argument("--per-client", action="store_true", help="one row per client and round")
    args = p.parse_args(argv)
    rows = [row for run in args.runs for row in analyse(run, per_client=args.per_client)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    command = "python benchmarks/update_alignment.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out.with_suffix(".json").write_text(json.dumps({"date": date, "command": command, "rows": rows}, indent=2))
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if args.per_client:
        print(f"{'run':56s} round  client     weight  |d_k|   cos(d_k, mean)  head bias shift  of its bound")
        for row in rows:
            print(
                f"{row['run'][-56:]:56s} {row['round']:5d}  {row['client']:9s} {row['weight']:6.3f} {row['norm']:7.2f}"
                f"  {row['cosine_with_mean']:+14.3f}  {row['head_bias_shift']:+15.3f}  {row['saturation']:12.0%}"
            )
        return 0
    print(f"{'run':60s} round  client |d|  |mean d|  alignment (noise-only)  cosine")
    for row in rows:
        print(
            f"{row['run'][:60]:60s} {row['round']:5d}  {row['client_norm']:10.4f}  {row['mean_norm']:8.4f}"
            f"  {row['alignment']:9.3f} ({row['noise_only_alignment']:.3f})  {row['cosine']:7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
