"""DP-SGD step time over non-private step time, on the same batches and the same model.

For each batch size, both modes run the *same* fixed batches of real SST-2 training
sentences (padded to their longest, as in training) through LoRA on all-MiniLM-L6-v2:

* non-private: ``fedtune.train.plain_step`` (forward, backward, AdamW step);
* DP-SGD: ``fedtune.train.dp_step`` on an Opacus ``GradSampleModule`` + ``DPOptimizer``
  (per-sample gradients, per-example clipping, Gaussian noise, AdamW step).

Poisson sampling itself is not timed (it is the batch contents that are held equal). Each
(mode, batch size) runs in a fresh subprocess, so its peak RSS is its own: ``--warmup``
untimed steps, then ``--steps`` timed ones. The table reports medians and the ratio of
medians; the two modes of one batch size run back to back so drifting load hits both.

Usage::

    python benchmarks/dp_overhead.py --out benchmarks/results/dp_overhead.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.model import LoraSettings, build_peft_model, load_model_and_tokenizer
from fedtune.train import TrainConfig, attach_dp, detach_dp, dp_step, make_optimizer, plain_step

logger = logging.getLogger("dp_overhead")

SST2_TRAIN = "sst2/hf_parquet/train-00000-of-00001.parquet"


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _load_sentences(glue_dir: Path, count: int, seed: int) -> list[str]:
    import pandas as pd

    frame = pd.read_parquet(glue_dir / SST2_TRAIN, columns=["sentence"])
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(frame), size=count, replace=False)
    return [str(s) for s in frame["sentence"].iloc[rows]]


def _batches(tokenizer: Any, sentences: list[str], batch_size: int, count: int,
             max_length: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(count):
        chunk = sentences[(i * batch_size) % len(sentences):][:batch_size]
        if len(chunk) < batch_size:
            chunk = (chunk + sentences)[:batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc["labels"] = torch.randint(0, 2, (batch_size,), generator=torch.Generator().manual_seed(i))
        out.append(dict(enc))
    return out


def _time_mode(private: bool, model_template: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
               warmup: int, config: TrainConfig) -> list[float]:
    import copy

    model = copy.deepcopy(model_template)
    model.train()
    device = torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    gsm = dp_opt = None
    if private:
        gsm, dp_opt = attach_dp(model, optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=batches[0]["input_ids"].shape[0],
                                noise_generator=torch.Generator().manual_seed(0))
    times = []
    try:
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            if private:
                dp_step(gsm, dp_opt, batch, device)
            else:
                plain_step(model, optimizer, batch, device)
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times.append(elapsed)
    finally:
        if gsm is not None:
            detach_dp(gsm)
    return times


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time one mode at one batch size in this (fresh) process; return the measurements."""
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    model = build_peft_model(base, LoraSettings())
    n_batches = args.warmup + args.steps
    sentences = _load_sentences(args.glue_dir, args.worker_batch * n_batches, seed=0)
    batches = _batches(tokenizer, sentences, args.worker_batch, n_batches, args.max_length)
    rss_before = _peak_rss_mb()
    times = _time_mode(args.worker == "dp", model, batches, args.warmup, TrainConfig())
    return {
        "times_s": times,
        "median_seq_len": statistics.median(b["input_ids"].shape[1] for b in batches),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_mb_before_training": rss_before,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }


def _run_worker(mode: str, batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode,
           "--worker-batch", str(batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--max-length", str(args.max_length), "--glue-dir", str(args.glue_dir)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--glue-dir", type=Path,
                        default=Path(os.environ.get("FEDTUNE_DATA_DIR",
                                                    Path(__file__).resolve().parents[1].parent / "shared/data/glue")))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_overhead.json"))
    parser.add_argument("--worker", choices=["plain", "dp"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.stdout.write(json.dumps(_worker(args)) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    meta: dict[str, Any] = {}
    for batch_size in args.batch_sizes:
        plain = _run_worker("plain", batch_size, args)
        private = _run_worker("dp", batch_size, args)
        meta = private
        row = {
            "batch_size": batch_size,
            "median_seq_len": plain["median_seq_len"],
            "plain_median_s": statistics.median(plain["times_s"]),
            "dp_median_s": statistics.median(private["times_s"]),
            "plain_iqr_s": [float(np.percentile(plain["times_s"], q)) for q in (25, 75)],
            "dp_iqr_s": [float(np.percentile(private["times_s"], q)) for q in (25, 75)],
            "plain_peak_rss_mb": plain["peak_rss_mb"],
            "dp_peak_rss_mb": private["peak_rss_mb"],
        }
        row["ratio"] = row["dp_median_s"] / row["plain_median_s"]
        logger.info("batch %d: plain %.3fs, DP %.3fs, ratio %.2f", batch_size,
                    row["plain_median_s"], row["dp_median_s"], row["ratio"])
        rows.append(row)

    result = {
        "benchmark": "dp_overhead",
        "model": "all-MiniLM-L6-v2 + LoRA r=8 (query, value) + classifier",
        "trainable_parameters": meta.get("trainable_parameters"),
        "optimizer": TrainConfig().optimizer,
        "steps": args.steps,
        "warmup": args.warmup,
        "max_length": args.max_length,
        "torch": torch.__version__,
        "torch_threads": meta.get("torch_threads"),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "platform": platform.platform(),
        "command": "python benchmarks/dp_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        "| batch | median seq len | non-private step (s) | DP-SGD step (s) | DP / non-private "
        "| peak RSS non-private (MB) | peak RSS DP (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['median_seq_len']:.0f} | {r['plain_median_s']:.3f} | "
            f"{r['dp_median_s']:.3f} | {r['ratio']:.2f}x | {r['plain_peak_rss_mb']:.0f} | "
            f"{r['dp_peak_rss_mb']:.0f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.write(f"\nwritten to {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
