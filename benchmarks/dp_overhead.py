"""DP-SGD step time over non-private step time, on the same batches and the same model.

For each batch size, both modes run the *same* fixed batches of real SST-2 training
sentences (padded to their longest, as in training) through LoRA on all-MiniLM-L6-v2:

* non-private: ``fedtune.train.plain_step`` (forward, backward, AdamW step);
* DP-SGD: ``fedtune.train.dp_step`` on an Opacus ``GradSampleModule`` + ``DPOptimizer``
  (per-sample gradients, per-example clipping, Gaussian noise, AdamW step).

Poisson sampling itself is not timed (it is the batch contents that are held equal).

Timing is *paired*: one process per batch size holds two copies of the model (one wrapped by
Opacus) and, for every batch, times a non-private step and a DP step back to back, in
alternating order. Load from other processes on a shared machine then hits both modes alike;
the table reports the medians over ``--steps`` timed batches (after ``--warmup``), their ratio,
and the median of the per-batch ratios. Peak memory is measured separately, one fresh
subprocess per (mode, batch size), so each peak RSS is that mode's own.

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


def _batches(
    tokenizer: Any, sentences: list[str], batch_size: int, count: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(count):
        chunk = sentences[(i * batch_size) % len(sentences) :][:batch_size]
        if len(chunk) < batch_size:
            chunk = (chunk + sentences)[:batch_size]
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc["labels"] = torch.randint(0, 2, (batch_size,), generator=torch.Generator().manual_seed(i))
        out.append(dict(enc))
    return out


def _time_mode(
    private: bool,
    model_template: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    warmup: int,
    config: TrainConfig,
) -> list[float]:
    import copy

    model = copy.deepcopy(model_template)
    model.train()
    device = torch.device("cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    gsm = dp_opt = None
    if private:
        gsm, dp_opt = attach_dp(
            model,
            optimizer,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=batches[0]["input_ids"].shape[0],
            noise_generator=torch.Generator().manual_seed(0),
        )
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


def _setup(args: argparse.Namespace, batch_size: int) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    model = build_peft_model(base, LoraSettings())
    n_batches = args.warmup + args.steps
    sentences = _load_sentences(args.glue_dir, batch_size * n_batches, seed=0)
    return model, _batches(tokenizer, sentences, batch_size, n_batches, args.max_length)


def _paired_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time both modes on the same batches, interleaved, in this process."""
    import copy

    model, batches = _setup(args, args.worker_batch)
    device = torch.device("cpu")
    config = TrainConfig()
    plain_model, dp_model = copy.deepcopy(model), copy.deepcopy(model)
    plain_model.train()
    dp_model.train()
    plain_opt = make_optimizer([p for p in plain_model.parameters() if p.requires_grad], config)
    gsm, dp_opt = attach_dp(
        dp_model,
        make_optimizer([p for p in dp_model.parameters() if p.requires_grad], config),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=args.worker_batch,
        noise_generator=torch.Generator().manual_seed(0),
    )

    def timed(fn: Any) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    plain_times, dp_times = [], []
    try:
        for i, batch in enumerate(batches):
            run_plain = lambda b=batch: plain_step(plain_model, plain_opt, b, device)  # noqa: E731
            run_dp = lambda b=batch: dp_step(gsm, dp_opt, b, device)  # noqa: E731
            if i % 2 == 0:
                tp, td = timed(run_plain), timed(run_dp)
            else:
                td, tp = timed(run_dp), timed(run_plain)
            if i >= args.warmup:
                plain_times.append(tp)
                dp_times.append(td)
    finally:
        detach_dp(gsm)
    return {
        "plain_times_s": plain_times,
        "dp_times_s": dp_times,
        "median_seq_len": statistics.median(b["input_ids"].shape[1] for b in batches),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }


def _memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of one mode alone (``--memory-steps`` steps) in this fresh process."""
    model, batches = _setup(args, args.worker_batch)
    rss_before = _peak_rss_mb()
    _time_mode(args.worker == "dp", model, batches[: args.memory_steps], 0, TrainConfig())
    return {"peak_rss_mb": _peak_rss_mb(), "peak_rss_mb_before_training": rss_before}


def _run_worker(mode: str, batch_size: int, args: argparse.Namespace) -> dict[str, Any]:
    import subprocess

    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--worker-batch",
        str(batch_size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--memory-steps",
        str(args.memory_steps),
        "--max-length",
        str(args.max_length),
        "--glue-dir",
        str(args.glue_dir),
    ]
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
    parser.add_argument(
        "--glue-dir",
        type=Path,
        default=Path(
            os.environ.get("FEDTUNE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared/data/glue")
        ),
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dp_overhead.json"))
    parser.add_argument("--memory-steps", type=int, default=5, help="steps per peak-RSS measurement")
    parser.add_argument("--worker", choices=["paired", "plain", "dp"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker = _paired_worker if args.worker == "paired" else _memory_worker
        sys.stdout.write(json.dumps(worker(args)) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    rows = []
    meta: dict[str, Any] = {}
    for batch_size in args.batch_sizes:
        timing = _run_worker("paired", batch_size, args)
        plain_mem = _run_worker("plain", batch_size, args)
        dp_mem = _run_worker("dp", batch_size, args)
        meta = timing
        plain_t, dp_t = timing["plain_times_s"], timing["dp_times_s"]
        row = {
            "batch_size": batch_size,
            "median_seq_len": timing["median_seq_len"],
            "plain_median_s": statistics.median(plain_t),
            "dp_median_s": statistics.median(dp_t),
            "ratio": statistics.median(dp_t) / statistics.median(plain_t),
            "median_paired_ratio": statistics.median(d / p for d, p in zip(dp_t, plain_t)),
            "plain_iqr_s": [float(np.percentile(plain_t, q)) for q in (25, 75)],
            "dp_iqr_s": [float(np.percentile(dp_t, q)) for q in (25, 75)],
            "plain_peak_rss_mb": plain_mem["peak_rss_mb"],
            "dp_peak_rss_mb": dp_mem["peak_rss_mb"],
            "plain_times_s": plain_t,
            "dp_times_s": dp_t,
        }
        logger.info(
            "batch %d: plain %.3fs, DP %.3fs, ratio %.2f (paired %.2f)",
            batch_size,
            row["plain_median_s"],
            row["dp_median_s"],
            row["ratio"],
            row["median_paired_ratio"],
        )
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
        "| median paired ratio | peak RSS non-private (MB) | peak RSS DP (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['median_seq_len']:.0f} | {r['plain_median_s']:.3f} | "
            f"{r['dp_median_s']:.3f} | {r['ratio']:.2f}x | {r['median_paired_ratio']:.2f}x | "
            f"{r['plain_peak_rss_mb']:.0f} | "
            f"{r['dp_peak_rss_mb']:.0f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.write(f"\nwritten to {args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
