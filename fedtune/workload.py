"""Everything one process needs for a run, built once and cached: data, shards, tokenizer, model.

Simulated clients run in Ray worker processes that serve many rounds (and several clients): the
tokenized data and the pretrained weights are loaded once per process (:func:`get_workload`), and
each process trains one model in place.

In a deployment each machine holds only its own data (a client its shard, the server the
evaluation split); it builds the same model with :func:`build_template` (same settings, same seed)
and plans its rounds with :func:`local_plan`, so the weights exchanged have the same keys and shapes
and the privacy plan is the simulation's.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fedtune.config import RunConfig

__all__ = ["CANARY_DIR", "Workload", "build_template", "cache_key", "get_workload", "local_plan"]

#: A shard folder (:mod:`fedtune.data.shards` format) in a run's ``--out`` folder whose examples client 0
#: trains on besides its own shard: the included canaries of ``fedtune audit`` (fedtune.simulations.audit).
CANARY_DIR = "canaries"

log = logging.getLogger(__name__)


def build_template(config: RunConfig, num_labels: int) -> tuple[Any, Any]:
    """The peft model (adapter and head at their seeded initial values) and its tokenizer."""
    from fedtune.model import LoraSettings, build_peft_model, load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(config.model, num_labels, seed=config.seed, pooling=config.pooling)
    targets = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip()) or None
    lora = LoraSettings(
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=targets,
        ffa=config.ffa_lora,
    )
    return build_peft_model(base, lora, seed=config.seed), tokenizer


def local_plan(config: RunConfig, examples: int) -> tuple[float, int]:
    """Poisson rate ``q = B_k / N`` and optimizer steps per round for a shard of ``examples``.

    ``B_k`` is :meth:`RunConfig.client_batch_size`: ``min(B, N)``, or ``round(q N)`` under
    ``sampling_rate`` (then every client takes the same steps, ``ceil(epochs / (q rounds))``).

    A shard smaller than the batch size trains on all of its examples at every step (``q = 1``: no
    amplification by subsampling; the accountants handle it exactly). Steps per round are
    ``local_steps`` if set, else ``ceil(local_epochs * N / B)`` if set, else
    ``ceil(epochs * N / (B * rounds))``: ``epochs`` passes over the shard spread over the run. Used
    by the simulated clients and the deployed ones alike.
    """
    batch = config.client_batch_size(examples)  # validates examples
    # examples per step: B, or q N under a shared rate (not B_k, whose rounding varies by client)
    per_step = config.batch_size if config.sampling_rate is None else config.sampling_rate * examples
    if config.local_steps is not None:
        steps = config.local_steps
    elif config.local_epochs is not None:
        steps = max(1, math.ceil(config.local_epochs * examples / per_step))
    else:
        steps = max(1, math.ceil(config.epochs * examples / (per_step * config.rounds)))
    return batch / examples, steps


@dataclass
class Workload:
    """Data, partition, tokenizer and base model of a run (see :func:`get_workload`)."""

    config: RunConfig
    data: Any  # fedtune.data.GlueData
    shards: list[Any]  # raw (untokenized) client shards
    tokenizer: Any
    collator: Any
    _template: Any = field(repr=False)
    _tokenized: dict[int, Any] = field(default_factory=dict, repr=False)
    _packed: dict[int, Any] = field(default_factory=dict, repr=False)
    _work_model: Any = field(default=None, repr=False)
    _eval: Any = field(default=None, repr=False)

    @classmethod
    def build(cls, config: RunConfig, canaries: str | None = None) -> Workload:
        """Load and split the data of ``config``; ``canaries``: a shard folder appended to client 0's shard."""
        from fedtune.data import load_glue, make_collator, parse_partition_spec, partition_dataset

        data = load_glue(
            config.task,
            config.data_dir,
            seed=config.seed,
            max_train_examples=config.max_train_examples,
            max_eval_examples=config.max_eval_examples,
        )
        spec = parse_partition_spec(config.partition)
        alpha = spec.alpha if spec.alpha is not None else config.alpha
        if config.clients == 1:
            shards = [data.train]
        else:
            shards = partition_dataset(
                data.train, config.clients, spec.scheme, alpha, config.seed, min_partition_size=config.min_shard_size
            )
        if canaries is not None:
            from datasets import concatenate_datasets

            from fedtune.data.shards import read_shard

            shards[0] = concatenate_datasets([shards[0], read_shard(canaries, data.spec)])
        template, tokenizer = build_template(config, data.spec.num_labels)
        return cls(config, data, shards, tokenizer, make_collator(tokenizer), template)

    def new_model(self) -> Any:
        """A fresh copy of the peft model (adapter and head at their seeded initial values)."""
        return copy.deepcopy(self._template)

    def work_model(self) -> Any:
        """This process's one training model (a copy of the template, made on first use).

        A client loads the global weights into it and trains it in place each round, so a Ray
        actor that serves many rounds and clients allocates one model, not one per round.
        """
        if self._work_model is None:
            self._work_model = copy.deepcopy(self._template)
        return self._work_model

    def packed_train_set(self, partition_id: int) -> Any:
        """Tokenized shard of client ``partition_id`` padded once into tensors
        (:func:`fedtune.batching.pack_dataset`)."""
        from fedtune.batching import pack_dataset

        if partition_id not in self._packed:
            self._packed[partition_id] = pack_dataset(self.train_set(partition_id), self.tokenizer)
        return self._packed[partition_id]

    def train_set(self, partition_id: int) -> Any:
        """Tokenized shard of client ``partition_id``."""
        from fedtune.data import tokenize_dataset

        if not 0 <= partition_id < len(self.shards):
            raise ValueError(f"partition id must be in [0, {len(self.shards) - 1}], got {partition_id!r}")
        if partition_id not in self._tokenized:
            self._tokenized[partition_id] = tokenize_dataset(
                self.shards[partition_id], self.tokenizer, self.data.spec, self.config.max_length
            )
        return self._tokenized[partition_id]

    def eval_set(self) -> Any:
        """Tokenized evaluation split (server-side central evaluation)."""
        from fedtune.data import tokenize_dataset

        if self._eval is None:
            self._eval = tokenize_dataset(self.data.eval, self.tokenizer, self.data.spec, self.config.max_length)
        return self._eval

    def steps_per_round(self, partition_id: int) -> int:
        """Local optimizer steps per round for a client (:func:`local_plan`)."""
        return local_plan(self.config, len(self.shards[partition_id]))[1]

    def sampling_rate(self, partition_id: int) -> float:
        """Poisson rate q = B_k / N of a client (:func:`local_plan`)."""
        return local_plan(self.config, len(self.shards[partition_id]))[0]

    def batch_size(self, partition_id: int) -> int:
        """Expected batch of a client (:meth:`RunConfig.client_batch_size`)."""
        return self.config.client_batch_size(len(self.shards[partition_id]))


#: RunConfig fields that decide the model a process builds and how its text is tokenized.
MODEL_FIELDS: tuple[str, ...] = (
    "task",
    "model",
    "seed",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "ffa_lora",
    "pooling",
    "max_length",
)
#: RunConfig fields that decide, with :data:`MODEL_FIELDS`, the data a simulation loads and splits.
DATA_FIELDS: tuple[str, ...] = (
    "data_dir",
    "clients",
    "partition",
    "alpha",
    "min_shard_size",
    "max_train_examples",
    "max_eval_examples",
)


def cache_key(config: RunConfig, *, data: bool = True) -> RunConfig:
    """The settings that decide what a process builds once and reuses (everything else at its default).

    Runs that differ only in training or privacy settings (rounds, epsilon, learning rate, batch
    size, ...) share one cached model and dataset. ``data=False``: the model only (a deployed
    client, whose data is its own shard file).
    """
    keep = MODEL_FIELDS + (DATA_FIELDS if data else ())
    return RunConfig(**{name: getattr(config, name) for name in keep})


@lru_cache(maxsize=4)
def _cached(key: RunConfig, canaries: str | None = None) -> Workload:
    return Workload.build(key, canaries)


def get_workload(config: RunConfig) -> Workload:
    """The process-wide :class:`Workload` for ``config`` (built on first use).

    If the run folder holds :data:`CANARY_DIR` (written by ``fedtune audit`` before the run starts),
    client 0's shard also holds its examples.
    """
    canaries = config.out_dir / CANARY_DIR
    workload = _cached(cache_key(config), str(canaries.resolve()) if canaries.is_dir() else None)
    if workload.config != config:
        workload = copy.copy(workload)
        workload.config = config
    return workload
