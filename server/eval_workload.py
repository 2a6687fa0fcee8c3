"""The deployed server's workload: the evaluation split and the model, no client data.

In a simulation the ServerApp shares the :class:`~fedtune.workload.Workload` that partitions the
training set. A deployed server never sees the clients' training data: it loads only the task's
evaluation split (from ``--data-dir`` or the hub) and the same model template as the clients.
It offers the attributes :func:`fedtune.server.app.run_server` uses; ``shards`` is empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedtune.config import RunConfig

__all__ = ["EvalWorkload"]


@dataclass
class EvalWorkload:
    """Evaluation data, tokenizer and model template of a deployed server."""

    config: RunConfig
    data: Any  # fedtune.data.GlueData (its train split is never used)
    tokenizer: Any
    collator: Any
    _template: Any = field(repr=False)
    shards: list[Any] = field(default_factory=list)
    _eval: Any = field(default=None, repr=False)

    @classmethod
    def build(cls, config: RunConfig) -> EvalWorkload:
        from fedtune.data import load_glue, make_collator
        from fedtune.workload import build_template

        data = load_glue(config.task, config.data_dir, seed=config.seed, max_eval_examples=config.max_eval_examples)
        template, tokenizer = build_template(config, data.spec.num_labels)
        return cls(config, data, tokenizer, make_collator(tokenizer), template)

    def new_model(self) -> Any:
        """A fresh copy of the peft model at its seeded initial values."""
        import copy

        return copy.deepcopy(self._template)

    def eval_set(self) -> Any:
        """Tokenized evaluation split."""
        from fedtune.data import tokenize_dataset

        if self._eval is None:
            self._eval = tokenize_dataset(self.data.eval, self.tokenizer, self.data.spec, self.config.max_length)
        return self._eval
