"""The DP-SGD engine at real scale: padding, step speed, memory and a full SST-2 epoch.

Figures of issue 9, each measured on real SST-2 training sentences with the default model
(all-MiniLM-L6-v2, LoRA r 8) on this machine:

``padding``
    Padding efficiency (real / computed tokens) of Poisson logical batches of 256, 1,024 and
    4,096: *before*, one batch padded to its longest sentence; *after*, length-sorted
    micro-batches cut by :func:`fedtune.batching.partition_sorted`.
``step``
    Tokens per second of one DP logical step against one non-private logical step over the
    *same* micro-batches, timed back to back in alternating order (paired), at each logical
    batch; plus the *before* engine (the whole Poisson batch as one micro-batch padded to its
    longest) at 256, the largest it fits in memory.
``memory``
    Peak RSS of a fresh training process running DP-SGD for ``--memory-steps`` logical steps in
    each of two rounds (the client's in-place model, as in a Ray actor), and its RSS after each
    round, per logical batch size.
``actor``
    Peak RSS of each real Ray client actor during ``fedtune simulate`` (2 clients of 10,000
    sentences, logical batch 1,024, ``--actor-rounds`` rounds), in the first and second half of
    the run (growth from round to round shows there).
``epoch``
    One full DP epoch over all 67,349 training sentences at logical batch 1,024 and epsilon 8
    (sigma calibrated and certified for that epoch), against a plain non-private PyTorch epoch
    over the same sentences in the same sorted micro-batches (the floor), in fp32 and under
    bf16 autocast; with the dev accuracy each reaches (the accuracy effect of bf16).

Every part runs in its own subprocess (so each peak RSS is that part's own) and the results
are merged into ``--out`` (JSON) after each part, so an interrupted run keeps what finished and
``--parts`` can redo one.

Usage::

    python benchmarks/dp_engine.py --out benchmarks/results/dp_engine.json
    python benchmarks/dp_engine.py --parts epoch --out benchmarks/results/dp_engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (256, 1024, 4096)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(glue: str, max_train: int | None = None) -> dict[str, Any]:
    import torch

    from fedtune.batching import pack_dataset
    from fedtune.data import load_glue, make_collator, tokenize_dataset
    from fedtune.model import LoraSettings, build_peft_model, load_model_and_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    data = load_glue("sst2", glue, seed=0, max_train_examples=max_train)
    base, tok = load_model_and_tokenizer(None, 2, seed=0)
    model = build_peft_model(base, LoraSettings(), seed=0)
    train = pack_dataset(tokenize_dataset(data.train, tok, data.spec, 128), tok)
    dev = tokenize_dataset(data.eval, tok, data.spec, 128)
    return {"model": model, "train": train, "dev": dev, "collator": make_collator(tok)}


def part_padding(args: argparse.Namespace) -> dict[str, Any]:
    from fedtune.batching import MICRO_BATCH_OVERHEAD_TOKENS, auto_physical_batch_size

    env = _setup(args.glue)
    train = env["train"]
    physical = auto_physical_batch_size(env["model"].config, train.max_length)
    rng = np.random.default_rng(0)
    lengths = train.lengths.numpy()
    rows = []
    for b in BATCHES:
        real = before = after = micro = 0
        for _ in range(args.padding_samples):
            idx = np.nonzero(rng.random(len(train)) < b / len(train))[0]
            mbs = train.micro_batches(idx, physical)
            real += int(lengths[idx].sum())
            before += len(idx) * int(lengths[idx].max())
            after += sum(m.computed_tokens for m in mbs)
            micro += len(mbs)
        rows.append(
            {
                "logical_batch": b,
                "efficiency_before": real / before,
                "efficiency_after": real / after,
                "micro_batches_per_step": micro / args.padding_samples,
            }
        )
        _log(f"padding B={b}: before {real / before:.3f}, after {real / after:.3f}")
    return {
        "physical_batch_size": physical,
        "overhead_tokens": MICRO_BATCH_OVERHEAD_TOKENS,
        "samples_per_batch_size": args.padding_samples,
        "rows": rows,
    }


def _pair_timing(
    env: dict[str, Any], b: int, repeats: int, precision: str, before: bool, dropout: bool = True
) -> dict[str, Any]:
    import copy
    import warnings

    import torch

    from fedtune.batching import auto_physical_batch_size
    from fedtune.train import TrainConfig, attach_dp, detach_dp, dp_logical_step, make_optimizer, plain_logical_step

    warnings.filterwarnings("ignore")
    train = env["train"]
    cpu = torch.device("cpu")
    physical = b if before else auto_physical_batch_size(env["model"].config, train.max_length, logical_batch_size=b)
    plain_model = copy.deepcopy(env["model"])
    dp_model = copy.deepcopy(env["model"])
    if not dropout:  # the lever measured: the frozen encoder's dropout off
        for module in [*plain_model.modules(), *dp_model.modules()]:
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    config = TrainConfig(batch_size=b)
    plain_opt = make_optimizer([p for p in plain_model.parameters() if p.requires_grad], config)
    gsm, dp_opt = attach_dp(
        dp_model,
        make_optimizer([p for p in dp_model.parameters() if p.requires_grad], config),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=b,
    )
    rng = np.random.default_rng(1)
    dp_times, plain_times, real, computed = [], [], 0, 0
    for r in range(repeats + 1):
        idx = np.nonzero(rng.random(len(train)) < b / len(train))[0]
        if before:  # the whole Poisson batch padded to its longest sentence
            mbs = train.micro_batches(idx, len(idx) + 1, overhead_tokens=10**9, min_efficiency=0.0)
        else:
            mbs = train.micro_batches(idx, physical)
        order = ("dp", "plain") if r % 2 else ("plain", "dp")
        times = {}
        for mode in order:
            t = time.perf_counter()
            if mode == "dp":
                dp_logical_step(gsm, dp_opt, mbs, cpu, precision)
            else:
                plain_logical_step(plain_model, plain_opt, mbs, cpu, precision)
            times[mode] = time.perf_counter() - t
        if r == 0:
            continue  # warm-up
        dp_times.append(times["dp"])
        plain_times.append(times["plain"])
        real += sum(m.real_tokens for m in mbs)
        computed += sum(m.computed_tokens for m in mbs)
    detach_dp(gsm)
    ratios = [d / p for d, p in zip(dp_times, plain_times)]
    return {
        "logical_batch": b,
        "engine": ("before" if before else "after") + ("" if dropout else ", dropout off"),
        "precision": precision,
        "physical_batch_size": physical,
        "repeats": repeats,
        "dp_seconds_per_step": float(np.median(dp_times)),
        "plain_seconds_per_step": float(np.median(plain_times)),
        "dp_tokens_per_second": real / sum(dp_times),
        "plain_tokens_per_second": real / sum(plain_times),
        "paired_ratio_median": float(np.median(ratios)),
        "padding_efficiency": real / computed,
    }


def part_step(args: argparse.Namespace) -> dict[str, Any]:
    env = _setup(args.glue)
    rows = []
    for b in BATCHES:
        for precision in args.precisions:
            row = _pair_timing(
                env, b, args.step_repeats if b < 4096 else max(2, args.step_repeats // 2), precision, before=False
            )
            rows.append(row)
            _log(
                f"step B={b} {precision}: DP {row['dp_tokens_per_second']:.0f} tok/s, "
                f"plain {row['plain_tokens_per_second']:.0f}, "
                f"paired ratio {row['paired_ratio_median']:.3f}"
            )
    row = _pair_timing(env, 256, args.step_repeats, "fp32", before=True)
    rows.append(row)
    _log(f"step before B=256: DP {row['dp_tokens_per_second']:.0f} tok/s, ratio {row['paired_ratio_median']:.3f}")
    row = _pair_timing(env, 1024, args.step_repeats, "bf16", before=False, dropout=False)
    rows.append(row)
    _log(
        f"step B=1024 bf16 dropout off: DP {row['dp_tokens_per_second']:.0f} tok/s, "
        f"ratio {row['paired_ratio_median']:.3f}"
    )
    return {"rows": rows}


def part_memory_one(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from fedtune.train import TrainConfig, train_local

    env = _setup(args.glue)
    proc = psutil.Process()
    b = args.memory_batch
    after_rounds, seconds = [], []
    start_rss = proc.memory_info().rss / 2**20
    for _ in range(2):
        res = train_local(
            env["model"],
            env["train"],
            None,
            TrainConfig(batch_size=b, steps=args.memory_steps, noise_multiplier=1.0, log_every=1),
            "cpu",
            in_place=True,
        )
        after_rounds.append(proc.memory_info().rss / 2**20)
        seconds.append(res.seconds)
    return {
        "logical_batch": b,
        "steps_per_round": args.memory_steps,
        "rss_before_mb": start_rss,
        "rss_after_round_mb": after_rounds,
        "peak_rss_mb": _peak_mb(),
        "seconds_per_round": seconds,
        "physical_batch_size": res.physical_batch_size,
    }


def part_epoch_one(args: argparse.Namespace) -> dict[str, Any]:
    from fedtune.evaluate import evaluate
    from fedtune.model import set_trainable_state
    from fedtune.privacy import calibrate_noise
    from fedtune.train import TrainConfig, train_local

    env = _setup(args.glue)
    train = env["train"]
    b = 1024
    steps = int(np.ceil(len(train) / b))
    q = b / len(train)
    sigma = None
    certified = None
    if args.epoch_mode == "dp":
        cal = calibrate_noise(8.0, 1e-5, sampling_rate=q, steps=steps)
        sigma, certified = cal.sigma, cal.certified_epsilon
    config = TrainConfig(
        batch_size=b,
        steps=steps,
        noise_multiplier=sigma,
        learning_rate=args.epoch_lr,
        precision=args.epoch_precision,
        log_every=5,
        dp_randomness="seeded",
        seed=0,
    )

    def show(p: Any) -> None:
        _log(
            f"  epoch {args.epoch_mode} {args.epoch_precision}: {p.step}/{p.total_steps} steps, {p.seconds:.0f}s, "
            f"{p.examples_per_second:.0f} ex/s, padding {p.padding_efficiency:.1%}"
        )

    res = train_local(env["model"], train, None, config, "cpu", progress=show, in_place=True)
    set_trainable_state(env["model"], res.state)
    acc = evaluate(env["model"], env["dev"], env["collator"], "sst2", "cpu")["accuracy"]
    return {
        "mode": args.epoch_mode,
        "precision": args.epoch_precision,
        "examples": len(train),
        "logical_batch": b,
        "steps": steps,
        "sampling_rate": q,
        "noise_multiplier": sigma,
        "certified_epsilon": certified,
        "learning_rate": args.epoch_lr,
        "seconds": res.seconds,
        "minutes": res.seconds / 60,
        "real_tokens": res.real_tokens,
        "computed_tokens": res.computed_tokens,
        "tokens_per_second": res.real_tokens / res.seconds,
        "padding_efficiency": res.padding_efficiency,
        "physical_batch_size": res.physical_batch_size,
        "dev_accuracy": acc,
        "peak_rss_mb": _peak_mb(),
    }


def part_actor(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of real Ray client actors in ``fedtune simulate`` at logical batch 1,024."""
    import tempfile

    import psutil

    out = Path(tempfile.mkdtemp(prefix="dp_engine_actor_"))
    cmd = [
        sys.executable,
        "-m",
        "fedtune.cli",
        "simulate",
        "--data-dir",
        args.glue,
        "--clients",
        "2",
        "--rounds",
        str(args.actor_rounds),
        "--local-steps",
        str(args.actor_steps),
        "--batch-size",
        "1024",
        "--max-train-examples",
        "20000",
        "--max-eval-examples",
        "200",
        "--epsilon",
        "8",
        "--out",
        str(out / "run"),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    series: dict[int, list[tuple[float, float]]] = {}
    while proc.poll() is None:
        try:
            for child in root.children(recursive=True):
                try:
                    if "ClientAppActor" in " ".join(child.cmdline()):
                        series.setdefault(child.pid, []).append(
                            (time.perf_counter() - started, child.memory_info().rss / 2**20)
                        )
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"simulate failed ({proc.returncode}): {stderr[-2000:]}")
    summary = json.loads((out / "run" / "summary.json").read_text())
    rounds = [float(r["seconds"]) for r in summary["rounds"][1:]]
    actors = []
    for pid, points in series.items():
        values = [m for _, m in points]
        half = len(values) // 2
        actors.append(
            {
                "pid": pid,
                "peak_rss_mb": max(values),
                "peak_first_half_mb": max(values[:half] or values),
                "peak_second_half_mb": max(values[half:] or values),
                "samples": len(values),
            }
        )
    return {
        "clients": 2,
        "rounds": args.actor_rounds,
        "local_steps": args.actor_steps,
        "logical_batch": 1024,
        "examples_per_client": 10000,
        "round_seconds": rounds,
        "actors": actors,
        "final_accuracy": summary["final_accuracy"],
        "composed_epsilon": summary["composed_epsilon"],
        "ray_left_behind": [
            p.pid for p in psutil.process_iter(["cmdline"]) if "ClientAppActor" in " ".join(p.info["cmdline"] or [])
        ],
    }


def report(results: dict[str, Any]) -> str:
    """Markdown tables of whatever parts ``results`` holds (for docs/benchmarks.md)."""
    lines: list[str] = []
    if "padding" in results:
        r = results["padding"]
        lines += [
            f"Padding efficiency (real / computed tokens), {r['samples_per_batch_size']} Poisson batches per size, "
            f"micro-batches of at most {r['physical_batch_size']} ({r['date']}):",
            "",
            "| logical batch | before: padded to its longest | after: length-sorted micro-batches "
            "| micro-batches per step |",
            "|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {x['logical_batch']:,} | {x['efficiency_before']:.1%} | {x['efficiency_after']:.1%} | "
            f"{x['micro_batches_per_step']:.1f} |"
            for x in r["rows"]
        ]
        lines.append("")
    if "step" in results:
        r = results["step"]
        lines += [
            f"One logical step, DP against non-private on the same micro-batches, timed back to back ({r['date']}):",
            "",
            "| logical batch | engine | precision | P | non-private tokens/s | DP tokens/s | DP step "
            "| median paired DP / non-private |",
            "|--:|---|---|--:|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {x['logical_batch']:,} | {x['engine']} | {x['precision']} | {x['physical_batch_size']} | "
            f"{x['plain_tokens_per_second']:.0f} | "
            f"{x['dp_tokens_per_second']:.0f} | {x['dp_seconds_per_step']:.2f} s | {x['paired_ratio_median']:.3f}× |"
            for x in r["rows"]
        ]
        lines.append("")
    if "memory" in results:
        r = results["memory"]
        lines += [
            f"Memory of a fresh training process, DP, two rounds in place ({r['date']}):",
            "",
            "| logical batch | steps per round | P | RSS before | RSS after round 1 | RSS after round 2 | peak RSS |",
            "|--:|--:|--:|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {x['logical_batch']:,} | {x['steps_per_round']} | {x['physical_batch_size']} | "
            f"{x['rss_before_mb']:.0f} MB | "
            f"{x['rss_after_round_mb'][0]:.0f} MB | {x['rss_after_round_mb'][1]:.0f} MB | {x['peak_rss_mb']:.0f} MB |"
            for x in r["rows"]
        ]
        lines.append("")
    if "actor" in results:
        r = results["actor"]
        lines += [
            f"Ray client actors in `fedtune simulate` (2 clients x {r['examples_per_client']:,} sentences, "
            "logical batch 1,024, "
            f"{r['rounds']} rounds x {r['local_steps']} steps; {r['date']}):",
            "",
            "| actor | peak RSS, first half of the run | peak RSS, second half | peak RSS |",
            "|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {i} | {a['peak_first_half_mb']:.0f} MB | {a['peak_second_half_mb']:.0f} MB | "
            f"{a['peak_rss_mb']:.0f} MB |"
            for i, a in enumerate(r["actors"])
        ]
        lines.append("")
    if "epoch" in results:
        rows = results["epoch"]["rows"]
        lines += [
            "One epoch over all 67,349 SST-2 training sentences, logical batch 1,024 (66 steps), AdamW lr 2e-3, "
            "then dev accuracy (872 sentences):",
            "",
            "| run | precision | minutes | real tokens/s | padding efficiency | sigma (certified epsilon) "
            "| dev accuracy | peak RSS | date |",
            "|---|---|--:|--:|--:|--:|--:|--:|---|",
        ]
        for x in rows:
            sig = (
                "-" if x["noise_multiplier"] is None else f"{x['noise_multiplier']:.3f} ({x['certified_epsilon']:.3f})"
            )
            name = "DP-SGD, epsilon 8" if x["mode"] == "dp" else "plain PyTorch, non-private"
            lines.append(
                f"| {name} | {x['precision']} | {x['minutes']:.2f} | {x['tokens_per_second']:.0f} | "
                f"{x['padding_efficiency']:.1%} | "
                f"{sig} | {x['dev_accuracy']:.3f} | {x['peak_rss_mb']:.0f} MB | {x['date']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _child(args: argparse.Namespace, part: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", part, "--glue", args.glue, *extra]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _save(path: Path, results: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue", default=os.environ.get("FEDTUNE_DATA_DIR", "../shared/data/glue"))
    parser.add_argument("--out", default="benchmarks/results/dp_engine.json")
    parser.add_argument("--parts", default="padding,step,memory,epoch")
    parser.add_argument("--padding-samples", type=int, default=20)
    parser.add_argument("--step-repeats", type=int, default=6)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--memory-steps", type=int, default=8)
    parser.add_argument("--memory-batch", type=int, default=1024)
    parser.add_argument("--epoch-runs", default="dp:fp32,plain:fp32,dp:bf16,plain:bf16")
    parser.add_argument("--epoch-mode", default="dp")
    parser.add_argument("--epoch-precision", default="fp32")
    parser.add_argument("--epoch-lr", type=float, default=2e-3)
    parser.add_argument("--actor-rounds", type=int, default=3)
    parser.add_argument("--actor-steps", type=int, default=4)
    parser.add_argument("--report", action="store_true", help="print markdown tables of --out and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.precisions = [p for p in str(args.precisions).split(",") if p]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.child:
        fn = {
            "padding": part_padding,
            "step": part_step,
            "memory": part_memory_one,
            "epoch": part_epoch_one,
            "actor": part_actor,
        }[args.child]
        print(json.dumps(fn(args)))
        return 0

    out = Path(args.out)
    if args.report:
        print(report(json.loads(out.read_text())))
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    common = [
        "--padding-samples",
        str(args.padding_samples),
        "--step-repeats",
        str(args.step_repeats),
        "--precisions",
        ",".join(args.precisions),
        "--memory-steps",
        str(args.memory_steps),
        "--actor-rounds",
        str(args.actor_rounds),
        "--actor-steps",
        str(args.actor_steps),
    ]
    for part in [p for p in args.parts.split(",") if p]:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        _log(f"part {part}")
        if part in ("padding", "step", "actor"):
            results[part] = {**_child(args, part, common), "date": started}
        elif part == "memory":
            rows = []
            for b in BATCHES:
                rows.append(_child(args, "memory", [*common, "--memory-batch", str(b)]))
                _log(
                    f"memory B={b}: peak {rows[-1]['peak_rss_mb']:.0f} MB, "
                    f"after rounds {rows[-1]['rss_after_round_mb']}"
                )
                results["memory"] = {"rows": rows, "date": started}
                _save(out, results)
        elif part == "epoch":
            rows = results.get("epoch", {}).get("rows", [])
            for run in args.epoch_runs.split(","):
                mode, precision = run.split(":")
                row = _child(
                    args,
                    "epoch",
                    ["--epoch-mode", mode, "--epoch-precision", precision, "--epoch-lr", str(args.epoch_lr)],
                )
                row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                rows = [r for r in rows if (r["mode"], r["precision"]) != (mode, precision)] + [row]
                _log(
                    f"epoch {mode} {precision}: {row['minutes']:.2f} min, {row['tokens_per_second']:.0f} tok/s, "
                    f"padding {row['padding_efficiency']:.1%}, dev accuracy {row['dev_accuracy']:.3f}, "
                    f"peak {row['peak_rss_mb']:.0f} MB"
                )
                results["epoch"] = {"rows": rows}
                _save(out, results)
        _save(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
