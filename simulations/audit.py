"""``fedtune audit``: an empirical privacy audit of one ``fedtune simulate`` run.

The run is an ordinary simulation (the same :class:`~fedtune.config.RunConfig`, the same entry
point) with one addition: client 0 also trains on the *included* canaries. Before the run starts,

1. ``m`` canaries are drawn from the task's training split among the examples the run does not use
   (those left out by ``--max-train-examples``): real sentences, each with a random label different
   from its own (a canary whose random label happened to be its true one would be an ordinary
   example and test nothing). Each is included independently with probability 1/2 (seeded);
2. the included ones are written as a shard folder, ``OUT/canaries/`` (:data:`fedtune.workload.CANARY_DIR`),
   which the workload of every process appends to client 0's shard; the whole set with its secret
   membership bits goes to ``OUT/audit/canaries.json``, which training never reads.

After the run, the final global model (``OUT/adapter``) scores every canary by its loss on its canary
label (lower loss: guess IN; :func:`canary_scores`), and :func:`fedtune.privacy.audit.one_run_audit`
turns the guesses into an epsilon lower bound (Steinke, Nasr and Jagielski 2023). A loss-threshold membership attack
(:func:`fedtune.privacy.audit.loss_threshold_attack`) compares real examples of client 0's shard with
as many unused training examples. Outputs: ``OUT/audit.json``, ``OUT/audit.png`` and, beside the
secrets, ``OUT/audit/scores.json`` (every canary's loss, score and bit).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.config import RunConfig
from fedtune.errors import RunFailed
from fedtune.io import atomic_write_bytes, atomic_write_json, read_json

__all__ = [
    "AUDIT_DIR",
    "AUDIT_SCHEMA",
    "CanarySet",
    "DEFAULT_CANARIES",
    "add_parsers",
    "canary_scores",
    "example_losses",
    "plot_audit",
    "run_audit",
    "unused_examples",
]

log = logging.getLogger(__name__)

#: The auditor's folder in the run folder: the canaries with their membership bits, and the scores.
AUDIT_DIR = "audit"
AUDIT_SCHEMA = "fedtune.audit/1"
CANARY_SCHEMA = "fedtune.canaries/1"
DEFAULT_CANARIES = 1000
#: At most this many members and as many non-members for the membership attack (scoring cost).
DEFAULT_MIA_EXAMPLES = 5000
#: Stream of the audit's seeded random numbers (independent of the data split's and the run's).
_AUDIT_STREAM = 0xA0D17


@dataclass(frozen=True)
class CanarySet:
    """``m`` canaries: real examples with a changed label, each included in training with probability 1/2.

    Attributes
    ----------
    task : str
        The GLUE task.
    texts : tuple of tuple of str
        One tuple of the task's text columns per canary.
    labels : tuple of int
        The canary labels (what client 0 trains on when the canary is included).
    true_labels : tuple of int
        The examples' own labels (never trained on).
    included : tuple of bool
        The secret membership bits.
    seed : int
        Seed of the draw.
    """

    task: str
    texts: tuple[tuple[str, ...], ...]
    labels: tuple[int, ...]
    true_labels: tuple[int, ...]
    included: tuple[bool, ...]
    seed: int

    def __post_init__(self) -> None:
        m = len(self.texts)
        if not (len(self.labels) == len(self.true_labels) == len(self.included) == m):
            raise ValueError(
                f"a canary set needs one label, true label and bit per text: got {m} texts, "
                f"{len(self.labels)} labels, {len(self.true_labels)} true labels, {len(self.included)} bits"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def draw(cls, pool: Any, task: str, m: int, seed: int) -> CanarySet:
        """The first ``m`` rows of ``pool`` (already shuffled) as canaries, labels and bits from ``seed``."""
        from fedtune.data.glue import get_task_spec, label_array

        spec = get_task_spec(task)
        if len(pool) < m:
            raise ValueError(f"cannot draw {m} canaries from {len(pool)} examples")
        rows = pool.select(range(m))
        true = label_array(rows)
        rng = np.random.default_rng([seed, _AUDIT_STREAM, 1])
        labels = (true + rng.integers(1, spec.num_labels, size=m)) % spec.num_labels  # uniform among the others
        included = rng.random(m) < 0.5
        columns = [rows.with_format("arrow")[c].to_pylist() for c in spec.text_columns]
        return cls(
            task=spec.name,
            texts=tuple(zip(*columns)),
            labels=tuple(int(x) for x in labels),
            true_labels=tuple(int(x) for x in true),
            included=tuple(bool(x) for x in included),
            seed=seed,
        )

    def dataset(self, *, only_included: bool = False) -> Any:
        """The canaries with their canary labels as a dataset of the task's columns."""
        import datasets

        from fedtune.data.glue import get_task_spec

        spec = get_task_spec(self.task)
        keep = [i for i in range(len(self)) if self.included[i] or not only_included]
        data: dict[str, list[Any]] = {c: [self.texts[i][j] for i in keep] for j, c in enumerate(spec.text_columns)}
        data["label"] = [self.labels[i] for i in keep]
        return datasets.Dataset.from_dict(data, features=spec.features())

    def write_training_shard(self, out_dir: Path) -> Path:
        """Write the included canaries as the shard folder ``out_dir/canaries`` client 0 trains on."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from fedtune.data.shards import SHARD_FILE, SHARD_SCHEMA
        from fedtune.workload import CANARY_DIR

        folder = out_dir / CANARY_DIR
        table = self.dataset(only_included=True).with_format("arrow")[:]
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(folder / SHARD_FILE, sink.getvalue().to_pybytes())
        meta = {
            "schema": SHARD_SCHEMA,
            "task": self.task,
            "name": "canaries",
            "client": 0,
            "examples": sum(self.included),
            "notes": ["fedtune audit canaries: client 0 trains on these besides its own shard"],
        }
        atomic_write_json(folder / "shard.json", meta)
        return folder

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``OUT/audit/canaries.json``)."""
        return {
            "schema": CANARY_SCHEMA,
            "task": self.task,
            "seed": self.seed,
            "canaries": [
                {"text": list(t), "label": y, "true_label": t_y, "included": b}
                for t, y, t_y, b in zip(self.texts, self.labels, self.true_labels, self.included)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanarySet:
        """Inverse of :meth:`to_dict`."""
        if data.get("schema") != CANARY_SCHEMA:
            raise ValueError(
                f"not a fedtune canary set (schema {CANARY_SCHEMA!r} expected, got {data.get('schema')!r})"
            )
        rows = data["canaries"]
        return cls(
            task=data["task"],
            texts=tuple(tuple(r["text"]) for r in rows),
            labels=tuple(int(r["label"]) for r in rows),
            true_labels=tuple(int(r["true_label"]) for r in rows),
            included=tuple(bool(r["included"]) for r in rows),
            seed=int(data["seed"]),
        )


def _text_keys(dataset: Any, columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    return list(zip(*(dataset.with_format("arrow")[c].to_pylist() for c in columns)))


def unused_examples(config: RunConfig, used: Any) -> Any:
    """The task's training examples whose text the run does not train on, deduplicated, in a seeded order.

    ``used`` is the run's training set (``GlueData.train``: the ``--max-train-examples`` subset).
    """
    from fedtune.data import get_task_spec, load_glue

    columns = get_task_spec(config.task).text_columns
    full = load_glue(config.task, config.data_dir, seed=config.seed).train
    seen = set(_text_keys(used, columns))
    keep = []
    for index, key in enumerate(_text_keys(full, columns)):
        if key not in seen:
            seen.add(key)  # also drops duplicates within the unused rows
            keep.append(index)
    rng = np.random.default_rng([config.seed, _AUDIT_STREAM, 0])
    return full.select(rng.permutation(np.asarray(keep, dtype=np.int64)))


def example_losses(model: Any, dataset: Any, tokenizer: Any, config: RunConfig, batch_size: int = 64) -> np.ndarray:
    """Per-example cross-entropy of ``model`` on ``dataset`` (the task's columns and ``label``)."""
    import torch
    from torch.utils.data import DataLoader

    from fedtune.data import make_collator, tokenize_dataset
    from fedtune.model import pick_device

    device = pick_device()
    tokenized = tokenize_dataset(dataset, tokenizer, config.task, config.max_length)
    loader = DataLoader(tokenized, batch_size=batch_size, shuffle=False, collate_fn=make_collator(tokenizer))
    model.to(device)
    model.eval()
    losses: list[np.ndarray] = []
    with torch.inference_mode():
        for batch in loader:
            labels = batch.pop("labels").long()
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy())
    return np.concatenate(losses) if losses else np.zeros(0)


def canary_scores(losses: np.ndarray, labels: tuple[int, ...] | np.ndarray) -> np.ndarray:
    """Scores of canaries (higher: guess IN): minus the loss, centred on the median loss of the canary's label.

    A model that leans towards one class gives every canary labelled with that class a low loss,
    IN or OUT; subtracting each label's median removes that lean, which says nothing about
    membership. The median is taken over all canaries of the label, IN and OUT alike: the scores
    depend on the model and the public canaries only, never on the membership bits.
    """
    losses = np.asarray(losses, dtype=float)
    labels = np.asarray(labels)
    centred = np.empty_like(losses)
    for label in np.unique(labels):
        group = labels == label
        centred[group] = losses[group] - np.median(losses[group])
    return -centred


def _final_model(config: RunConfig, num_labels: int) -> tuple[Any, Any]:
    """The run's final global model, from ``OUT/adapter`` (peft format), and its tokenizer."""
    from peft import PeftModel

    from fedtune.model import load_model_and_tokenizer

    adapter = config.out_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{adapter} holds no adapter: the run did not finish")
    base, tokenizer = load_model_and_tokenizer(config.model, num_labels, seed=config.seed, pooling=config.pooling)
    return PeftModel.from_pretrained(base, str(adapter)), tokenizer


def _certified_epsilon(summary: dict[str, Any], client: str = "0") -> float:
    """Client ``client``'s certified (pld, composed over its rounds) epsilon from ``summary.json``."""
    for entry in summary.get("clients", []):
        if str(entry.get("id")) == client and entry.get("epsilon_certified") is not None:
            return float(entry["epsilon_certified"])  # "inf" as a string too
    return float(summary.get("composed_epsilon", math.inf))


def _check_args(canaries: object, confidence: object) -> None:
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise ValueError(f"--canaries must be an integer >= 2, got {canaries!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"--confidence must be in (0, 1), got {confidence!r}")


def run_audit(
    config: RunConfig,
    *,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = 0.95,
    resume: bool = False,
    mia_examples: int = DEFAULT_MIA_EXAMPLES,
) -> dict[str, Any]:
    """Insert canaries, run ``config`` through :func:`~fedtune.simulations.simulate.simulate`, audit it.

    Parameters
    ----------
    config : RunConfig
        The run (its ``out`` folder receives the run and the audit).
    canaries : int
        ``m >= 2`` canaries, each included in client 0's data with probability 1/2.
    confidence : float
        Confidence of the epsilon lower bound, in ``(0, 1)``.
    resume : bool
        Continue an interrupted audit in ``config.out`` (its canaries are reused; a finished run is
        only scored again).
    mia_examples : int
        At most this many members and as many non-members for the membership attack.

    Returns
    -------
    dict
        The content of ``OUT/audit.json``.

    Raises
    ------
    ValueError
        Bad ``canaries`` / ``confidence``, too few unused training examples for the canaries, or an
        output folder that already holds an audit (without ``resume``) or none (with it).
    fedtune.errors.RunFailed
        The run failed, or client 0 did not train on the canaries (its reported example count).
    """
    from fedtune.privacy.audit import loss_threshold_attack, one_run_audit
    from fedtune.simulations.simulate import simulate
    from fedtune.workload import CANARY_DIR, Workload, cache_key

    _check_args(canaries, confidence)
    out = config.out_dir
    secrets = out / AUDIT_DIR / "canaries.json"
    if resume and not secrets.is_file():
        raise ValueError(f"--resume {out}: no audit there (expected {secrets})")
    if not resume and (secrets.exists() or (out / CANARY_DIR).exists()):
        raise ValueError(f"{out} already holds an audit; pass --resume {out} to continue it or choose another --out")
    workload = Workload.build(cache_key(config))  # without canaries: client 0's own shard, the split, the tokenizer
    spec = workload.data.spec
    pool = unused_examples(config, workload.data.train)
    if resume:
        canary_set = CanarySet.from_dict(read_json(secrets))
    else:
        if len(pool) < canaries + 1:
            raise ValueError(
                f"--canaries {canaries} needs more than {canaries} training examples the run does not use, but only "
                f"{len(pool)} are left (--max-train-examples {config.max_train_examples}): lower --max-train-examples "
                "or --canaries"
            )
        canary_set = CanarySet.draw(pool, spec.name, canaries, config.seed)
        atomic_write_json(secrets, canary_set.to_dict())
        canary_set.write_training_shard(out)
    n_mia = min(len(workload.shards[0]), len(pool) - len(canary_set), mia_examples)
    rng = np.random.default_rng([config.seed, _AUDIT_STREAM, 2])
    members = workload.shards[0].select(np.sort(rng.choice(len(workload.shards[0]), n_mia, replace=False)))
    non_members = pool.select(range(len(canary_set), len(canary_set) + n_mia))

    summary_path = out / "summary.json"
    finished = summary_path.is_file() and read_json(summary_path).get("finished") is True
    if not (resume and finished):
        summary = simulate(config, resume=resume and (out / "checkpoint" / "state.json").exists())
    else:
        summary = read_json(summary_path)
        log.info("the run in %s is finished; scoring it again", out)

    trained = {str(c.get("id")): c.get("examples") for c in summary.get("clients", [])}.get("0")
    expected = len(workload.shards[0]) + sum(canary_set.included)
    if trained != expected:
        raise RunFailed(
            f"client 0 reported {trained} training examples, but its shard and the included canaries hold {expected}: "
            f"it did not train on {out / CANARY_DIR} (on a Ray cluster, --out must be a folder every machine shares)"
        )
    model, tokenizer = _final_model(config, spec.num_labels)
    canary_losses = example_losses(model, canary_set.dataset(), tokenizer, config)
    member_losses = example_losses(model, members, tokenizer, config)
    non_member_losses = example_losses(model, non_members, tokenizer, config)
    bits = np.asarray(canary_set.included, dtype=bool)
    scores = canary_scores(canary_losses, canary_set.labels)
    one_run = one_run_audit(scores, bits, delta=config.delta, confidence=confidence)
    attack = loss_threshold_attack(member_losses, non_member_losses)
    certified = _certified_epsilon(summary)
    result: dict[str, Any] = {
        "schema": AUDIT_SCHEMA,
        "empirical_epsilon": one_run.empirical_epsilon,
        "certified_epsilon": certified,
        "certified_by": summary.get("certified_by", "pld"),
        "confidence": one_run.confidence,
        "delta": config.delta,
        "epsilon_target": config.epsilon,
        "leakage_detected": one_run.empirical_epsilon > 0.0,
        "within_certified": one_run.empirical_epsilon <= certified,
        "audited_client": "0",
        "one_run": one_run.to_dict(),
        "canary_loss": {
            "mean_in": float(canary_losses[bits].mean()) if bits.any() else math.nan,
            "mean_out": float(canary_losses[~bits].mean()) if (~bits).any() else math.nan,
        },
        "membership_inference": {"attack": "loss-threshold (Yeom et al. 2018)", **attack.to_dict()},
        "final_accuracy": summary.get("final_accuracy"),
        "task": spec.name,
        "notes": [
            "empirical_epsilon is a lower bound at the given confidence (Steinke, Nasr and Jagielski 2023, one "
            f"run, black box: final model only); certified_epsilon is the {summary.get('certified_by', 'pld')} "
            "upper bound of the client holding the canaries (composed over its rounds)",
            "canaries: unused training sentences with a random label other than their own, each included with "
            "probability 1/2; score = minus the final model's loss on the canary label, centred on the median "
            "of the canaries with the same label",
            "membership inference: members from client 0's shard, non-members from unused training examples",
            *workload.data.notes,
        ],
    }
    atomic_write_json(
        out / AUDIT_DIR / "scores.json",
        {"canary_loss": canary_losses.tolist(), "canary_score": scores.tolist(), "included": bits.tolist()},
    )
    atomic_write_json(out / "audit.json", result)
    plot_audit(out / "audit.png", scores, bits, member_losses, non_member_losses, result)
    return result


def plot_audit(
    path: Path,
    scores: np.ndarray,
    included: np.ndarray,
    member_losses: np.ndarray,
    non_member_losses: np.ndarray,
    result: dict[str, Any],
) -> Path:
    """``audit.png``: canary score histograms (IN vs OUT) and the membership attack's ROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedtune.privacy.audit import roc_of_losses

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    bins = np.histogram_bin_edges(scores, bins=30)
    left.hist(scores[included], bins=bins, alpha=0.6, color="tab:red", label=f"IN ({int(included.sum())})")
    left.hist(scores[~included], bins=bins, alpha=0.6, color="tab:blue", label=f"OUT ({int((~included).sum())})")
    left.set_xlabel("score: minus the loss on the canary label, centred per label\n(high: guess IN)")
    left.set_ylabel("canaries")
    left.legend(fontsize=8)
    left.set_title("canaries", fontsize=10)
    fpr, tpr = roc_of_losses(member_losses, non_member_losses)
    mia = result["membership_inference"]
    right.plot(fpr, tpr, color="tab:purple", label=f"loss threshold, AUC {mia['auc']:.3f}")
    right.plot([0, 1], [0, 1], ":", color="tab:gray", label="chance")
    right.axvline(mia["fpr"], color="tab:gray", alpha=0.4)
    right.set_xlabel("false-positive rate")
    right.set_ylabel("true-positive rate")
    right.legend(fontsize=8, loc="lower right")
    right.set_title(f"membership inference: TPR {mia['tpr_at_fpr']:.3f} at FPR {mia['fpr']:g}", fontsize=10)
    fig.suptitle(
        f"empirical epsilon >= {result['empirical_epsilon']:.3f} ({100 * result['confidence']:g}% confidence) "
        f"vs certified epsilon {_fmt(result['certified_epsilon'])} (delta {result['delta']:g})",
        fontsize=10,
    )
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"


def format_audit(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    one, mia = result["one_run"], result["membership_inference"]
    return "\n".join(
        [
            f"empirical epsilon (lower bound, {100 * result['confidence']:g}% confidence): "
            f"{result['empirical_epsilon']:.4f}",
            f"certified epsilon (client 0, {result['certified_by']}, delta {result['delta']:g}): "
            f"{_fmt(result['certified_epsilon'])}",
            f"canaries: {one['canaries']} ({one['included']} included); best guesses {one['k_pos']} IN + "
            f"{one['k_neg']} OUT, {one['correct']} of {one['guesses']} correct "
            f"(tried {len(one['candidates'])} splits, Bonferroni-corrected)",
            f"membership inference (loss threshold): AUC {mia['auc']:.4f}, TPR {mia['tpr_at_fpr']:.4f} at FPR "
            f"{mia['fpr']:g} ({mia['members']} members vs {mia['non_members']} non-members)",
        ]
    )


def _confidence_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"confidence must be a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"confidence must be in (0, 1), got {text!r}")
    return value


def _canaries_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"canaries must be an integer >= 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"canaries must be an integer >= 2, got {text!r}")
    return value


def _audit(args: argparse.Namespace) -> int:
    from fedtune.cliargs import config_from_args
    from fedtune.io import jsonable

    config = config_from_args(args)
    result = run_audit(config, canaries=args.canaries, confidence=args.confidence, resume=bool(args.resume))
    print(json.dumps(jsonable(result), indent=2) if args.json else format_audit(result))
    print(f"\noutputs in {config.out_dir}/: audit.json, audit.png, audit/ (canaries and scores), and the run's own")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``audit``: ``simulate``'s options plus ``--canaries`` and ``--confidence``."""
    from fedtune.cliargs import add_run_options

    parser = subparsers.add_parser(
        "audit",
        help="empirical privacy audit: a simulate run with canaries, an epsilon lower bound and a membership attack",
    )
    add_run_options(parser, federated=True, out="runs/audit")
    parser.add_argument(
        "--canaries",
        type=_canaries_arg,
        default=DEFAULT_CANARIES,
        help=f"canaries, each included in client 0's data with probability 1/2 (default {DEFAULT_CANARIES})",
    )
    parser.add_argument(
        "--confidence",
        type=_confidence_arg,
        default=0.95,
        help="confidence of the epsilon lower bound, in (0, 1) (default 0.95)",
    )
    parser.set_defaults(handler=_audit)
