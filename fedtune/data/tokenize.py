"""Tokenize GLUE datasets for sequence classification, with dynamic padding.

Examples are truncated to ``max_length`` but not padded; :func:`make_collator` pads
each batch to its longest example.
"""

from __future__ import annotations

from typing import Any

import datasets
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from fedtune.data.glue import TaskSpec, get_task_spec

__all__ = ["MODEL_COLUMNS", "make_collator", "tokenize_dataset"]

MODEL_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "labels")
"""Columns a tokenized dataset may hold (``token_type_ids`` only if the tokenizer makes them)."""


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    spec: str | TaskSpec,
    max_length: int = 128,
) -> datasets.Dataset:
    """Tokenize the text columns of ``dataset`` and rename ``label`` to ``labels``.

    Parameters
    ----------
    dataset : datasets.Dataset
        Columns ``spec.text_columns`` and ``label`` (as from :func:`fedtune.data.glue.load_glue`).
    tokenizer : transformers.PreTrainedTokenizerBase
        Tokenizer of the model; sentence pairs are encoded as one pair input.
    spec : str or TaskSpec
        The task (gives the text columns).
    max_length : int
        Truncate longer inputs to this many tokens (pairs: longest-first).

    Returns
    -------
    datasets.Dataset
        Columns ``input_ids``, ``attention_mask``, ``token_type_ids`` (if the tokenizer
        returns it) and ``labels``; same row count and order; no padding.

    Raises
    ------
    ValueError
        Missing columns or a non-positive ``max_length``.
    """
    spec = get_task_spec(spec)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    missing = [c for c in (*spec.text_columns, "label") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset lacks columns {missing} for task {spec.name!r} (has {dataset.column_names})")
    cols = spec.text_columns

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [batch[c] for c in cols]
        enc = tokenizer(*texts, truncation=True, max_length=max_length, padding=False)
        out = {k: v for k, v in enc.items() if k in MODEL_COLUMNS}
        out["labels"] = batch["label"]
        return out

    return dataset.map(
        encode,
        batched=True,
        remove_columns=dataset.column_names,
        desc=f"Tokenizing {spec.name}",
    )


def make_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorWithPadding:
    """Return a collator that pads each batch to its longest example (PyTorch tensors)."""
    return DataCollatorWithPadding(tokenizer=tokenizer, padding="longest", return_tensors="pt")
