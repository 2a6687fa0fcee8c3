"""What does the classification head of all-MiniLM-L6-v2 see? A linear probe per pooling (issue 11).

``BertForSequenceClassification`` feeds the head ``tanh(pooler(h_CLS))``; all-MiniLM-L6-v2 was trained
by sentence-transformers with *mean* pooling, and its pooler weights were never trained
(:mod:`fedtune.model`). This script embeds a seeded sample of SST-2 training sentences with the frozen
encoder, takes three features per sentence (the CLS state, the pooler output, the attention-masked
mean of the last hidden states: ``--pooling mean``), fits an L2-regularised logistic regression on
each (scikit-learn, standardised features) and reports dev accuracy on all 872 dev sentences.
No fine-tuning, no DP: it measures the starting representation the DP fine-tuning builds on.

Usage::

    python benchmarks/pooling_probe.py --data-dir ../shared/data/glue --train 4000 \\
        --out benchmarks/results/pooling_probe
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np


def embed(model, tokenizer, sentences: list[str], batch: int = 64) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    import torch

    out: dict[str, list] = {"cls": [], "pooler": [], "mean": []}
    for start in range(0, len(sentences), batch):
        enc = tokenizer(
            sentences[start : start + batch], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        with torch.no_grad():
            result = model.bert(**enc)
        hidden, mask = result.last_hidden_state, enc["attention_mask"].unsqueeze(-1).float()
        out["cls"].append(hidden[:, 0])
        out["pooler"].append(result.pooler_output)
        out["mean"].append((hidden * mask).sum(1) / mask.sum(1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default: FEDTUNE_DATA_DIR)")
    parser.add_argument("--train", type=int, default=4000, help="training sentences for the probe (seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/pooling_probe")
    args = parser.parse_args(argv)
    if args.train < 100:
        parser.error(f"--train must be >= 100, got {args.train}")

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedtune.data.glue import load_glue
    from fedtune.model import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(None, 2, seed=args.seed, pooling="model")
    model.eval()
    data = load_glue("sst2", args.data_dir, seed=args.seed, max_train_examples=args.train)
    start = time.perf_counter()
    train, dev = (
        embed(model, tokenizer, list(data.train["sentence"])),
        embed(model, tokenizer, list(data.eval["sentence"])),
    )
    seconds = time.perf_counter() - start
    y_train, y_dev = np.asarray(data.train["label"]), np.asarray(data.eval["label"])
    rows = []
    for feature in ("cls", "pooler", "mean"):
        for c in (0.01, 0.1, 1.0):
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
            probe.fit(train[feature], y_train)
            rows.append({"feature": feature, "C": c, "dev_accuracy": float(probe.score(dev[feature], y_dev))})
            print(f"{feature:7s} C={c:<5g} dev accuracy {rows[-1]['dev_accuracy']:.4f}", flush=True)
    best = {f: max(r["dev_accuracy"] for r in rows if r["feature"] == f) for f in ("cls", "pooler", "mean")}
    report = {
        "command": "python benchmarks/pooling_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "train_sentences": len(y_train),
        "dev_sentences": len(y_dev),
        "dev_majority": float(max(np.mean(y_dev), 1 - np.mean(y_dev))),
        "embedding_seconds": round(seconds, 1),
        "rows": rows,
        "best": best,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    with out.with_suffix(".csv").open("w") as f:
        f.write("feature,C,dev_accuracy\n")
        f.writelines(f"{r['feature']},{r['C']},{r['dev_accuracy']:.4f}\n" for r in rows)
    print(f"best dev accuracy: {best}; wrote {out}.json and .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
