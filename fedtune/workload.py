"""Everything one process needs for a run, built once and cached: data, shards, tokenizer, model.

Simulated clients run in Ray worker processes that serve many rounds (and several clients): the
tokenized data and the pretrained weights are loaded once per process, and every round trains a fresh
copy of the model (so Opacus hooks never pile up).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fedtune.config import RunConfig

__all__ = ["Workload", "get_workload"]

log = logging.getLogger(__name__)


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
    def build(cls, config: RunConfig) -> Workload:
        from fedtune.data import load_glue, make_collator, parse_partition_spec, partition_dataset
        from fedtune.model import LoraSettings, build_peft_model, load_model_and_tokenizer

        data = load_glue(
            config.task, config.data_dir, seed=config.seed,
            max_train_examples=config.max_train_examples, max_eval_examples=config.max_eval_examples,
        )
        spec = parse_partition_spec(config.partition)
        alpha = spec.alpha if spec.alpha is not None else config.alpha
        if config.clients == 1:
            shards = [data.train]
        else:
            shards = partition_dataset(data.train, config.clients, spec.scheme, alpha, config.seed, min_partition_size=config.min_shard_size)
        base, tokenizer = load_model_and_tokenizer(config.model, data.spec.num_labels, seed=config.seed)
        targets = tuple(t.strip() for t in config.lora_targets.split(",") if t.strip()) or None
        lora = LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=targets)
        template = build_peft_model(base, lora, seed=config.seed)
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
        """Tokenized shard of client ``partition_id`` padded once into tensors (:func:`fedtune.batching.pack_dataset`)."""
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
            self._tokenized[partition_id] = tokenize_dataset(self.shards[partition_id], self.tokenizer, self.data.spec, self.config.max_length)
        return self._tokenized[partition_id]

    def eval_set(self) -> Any:
        """Tokenized evaluation split (server-side central evaluation)."""
        from fedtune.data import tokenize_dataset

        if self._eval is None:
            self._eval = tokenize_dataset(self.data.eval, self.tokenizer, self.data.spec, self.config.max_length)
        return self._eval

    def steps_per_round(self, partition_id: int) -> int:
        """Local optimizer steps per round for a client (:func:`fedtune.standalone.local_plan`)."""
        from fedtune.standalone import local_plan

        return local_plan(self.config, len(self.shards[partition_id]))[1]

    def sampling_rate(self, partition_id: int) -> float:
        """Poisson rate q = min(1, B / N) of a client (:func:`fedtune.standalone.local_plan`)."""
        from fedtune.standalone import local_plan

        return local_plan(self.config, len(self.shards[partition_id]))[0]

    def batch_size(self, partition_id: int) -> int:
        """Expected batch of a client: ``B``, or its whole shard if that is smaller."""
        return min(self.config.batch_size, len(self.shards[partition_id]))


def _data_key(config: RunConfig) -> RunConfig:
    # settings that do not change data or model share one workload
    return config.replace(rounds=1, epsilon=math.inf, out="", learning_rate=1.0, max_grad_norm=1.0, local_steps=None, local_epochs=1.0, accountant="saddlepoint", cpus_per_client=1.0, gpus_per_client=0.0, ray_address=None,
                          physical_batch_size=None, precision="fp32")


@lru_cache(maxsize=4)
def _cached(key: RunConfig) -> Workload:
    return Workload.build(key)


def get_workload(config: RunConfig) -> Workload:
    """The process-wide :class:`Workload` for ``config`` (built on first use)."""
    workload = _cached(_data_key(config))
    if workload.config != config:
        workload = copy.copy(workload)
        workload.config = config
    return workload
