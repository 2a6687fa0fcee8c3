"""Logical batches cut into length-sorted physical micro-batches.

DP-SGD's privacy is defined on the *logical* batch: Poisson sampling at ``q = B / N``, one
Gaussian noise draw per logical step. Memory and speed are defined by the *physical* micro-batch
that goes through the model at once. This module holds the data side of that split:

* :class:`PackedDataset` pads a tokenized dataset once into tensors (right or left, as the
  tokenizer pads) and keeps each example's real length, so a micro-batch is an index and a slice,
  not a Python collation;
* :meth:`PackedDataset.micro_batches` orders a sampled logical batch by length and cuts it into
  micro-batches of at most ``P`` examples, each padded only to its own longest example. The
  *set* of sampled examples is untouched (sorting happens after sampling), so the mechanism and
  its accounting are unchanged;
* :func:`auto_physical_batch_size` picks ``P`` from the model's shape, the longest example and
  the device, with the activation-memory model of Korthikanti et al. (2022).

Padding efficiency is real tokens over computed tokens (``sum(len_i) / sum(P_j * L_j)``). On
SST-2 (mean 13.4 tokens, max 63) a Poisson batch padded to its longest computes about 26% real
tokens; length-sorted micro-batches of 64 compute about 85-90%.

References
----------
V. Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
arXiv:2205.05198 (2022): activations per token and layer are about ``34 h + 5 a s`` bytes in
16-bit precision (hidden size ``h``, heads ``a``, sequence length ``s``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "MICRO_BATCH_OVERHEAD_TOKENS",
    "MIN_PADDING_EFFICIENCY",
    "MicroBatch",
    "PackedDataset",
    "activation_bytes_per_token",
    "auto_physical_batch_size",
    "pack_dataset",
    "partition_sorted",
]

logger = logging.getLogger(__name__)

#: Token columns padded with the tokenizer's values; any other list column is padded with 0.
_PAD_VALUES = ("input_ids", "token_type_ids", "attention_mask")
#: Fixed cost of one more micro-batch (a forward and backward pass), in computed-token equivalents:
#: measured on the 2-core CPU as 0.078 s per micro-batch against 3.2e-4 s per token.
MICRO_BATCH_OVERHEAD_TOKENS = 256
#: Fewest real tokens per computed token a logical batch's cut may give (see PackedDataset.micro_batches).
MIN_PADDING_EFFICIENCY = 0.8
_CPU_ACTIVATION_BUDGET = 1 << 30  # bytes of activations per micro-batch on a CPU
_CPU_MAX_PHYSICAL = 64  # measured fastest on the 2-core machine (docs/benchmarks.md, DP engine)
_GPU_MAX_PHYSICAL = 256


@dataclass(frozen=True)
class MicroBatch:
    """One physical micro-batch: model inputs sliced to its own longest example.

    Attributes
    ----------
    batch : dict of str to torch.Tensor
        Model inputs (``input_ids``, ``attention_mask``, ... and ``labels``).
    size : int
        Number of examples.
    real_tokens : int
        Sum of the examples' lengths (non-padding tokens).
    computed_tokens : int
        ``size * width``: tokens the model computes, padding included.
    """

    batch: dict[str, torch.Tensor]
    size: int
    real_tokens: int
    computed_tokens: int


class PackedDataset:
    """A tokenized dataset padded once into tensors, with each example's length.

    Parameters
    ----------
    columns : mapping of str to torch.Tensor
        Token columns of shape ``(N, W)`` (padded to the longest example, ``W``) and per-example
        columns of shape ``(N,)`` (``labels``).
    lengths : torch.Tensor
        ``(N,)`` real lengths (non-padding tokens).
    padding_side : {"right", "left"}
        Where the padding sits; a micro-batch of width ``L`` keeps the first ``L`` columns
        (right padding) or the last ``L`` (left padding).
    """

    def __init__(self, columns: Mapping[str, torch.Tensor], lengths: torch.Tensor, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        n = int(lengths.shape[0])
        for name, tensor in columns.items():
            if tensor.shape[0] != n:
                raise ValueError(f"column {name!r} has {tensor.shape[0]} rows, expected {n}")
        self.columns = dict(columns)
        self.lengths = lengths.to(torch.long)
        self.padding_side = padding_side
        self._lengths_np = self.lengths.numpy()

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def total_tokens(self) -> int:
        """Real tokens in the whole dataset."""
        return int(self.lengths.sum())

    @property
    def max_length(self) -> int:
        """Length of the longest example (0 for an empty dataset)."""
        return int(self.lengths.max()) if len(self) else 0

    def _slice(self, rows: np.ndarray, width: int) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(rows)
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.columns.items():
            picked = tensor.index_select(0, index)
            if picked.dim() >= 2:
                picked = picked[:, :width] if self.padding_side == "right" else picked[:, picked.shape[1] - width :]
                picked = picked.contiguous()
            out[name] = picked
        return out

    def micro_batches(
        self,
        indices: Sequence[int] | np.ndarray,
        physical_batch_size: int,
        overhead_tokens: int = MICRO_BATCH_OVERHEAD_TOKENS,
        min_efficiency: float = MIN_PADDING_EFFICIENCY,
    ) -> list[MicroBatch]:
        """Sort ``indices`` by length and cut them into micro-batches of at most ``physical_batch_size``.

        Each micro-batch is padded only to its own longest example. The cut points minimise
        ``sum_j (n_j * L_j + overhead_tokens)`` (:func:`partition_sorted`): the computed tokens
        plus a fixed cost per micro-batch, so a wide spread of lengths is split where the
        padding saved outweighs one more forward/backward pass. If that cut computes fewer than
        ``min_efficiency`` real tokens per computed token (small logical batches, where few
        examples spread over many lengths), the per-batch cost is halved until it does (at cost
        0 every chunk holds one length: efficiency 1). The order of the examples within
        the logical batch changes; which examples are in it does not. Returns ``[]`` for an
        empty logical batch.
        """
        if (
            isinstance(physical_batch_size, bool)
            or not isinstance(physical_batch_size, (int, np.integer))
            or physical_batch_size < 1
        ):
            raise ValueError(f"physical_batch_size must be an integer >= 1, got {physical_batch_size!r}")
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size == 0:
            return []
        rows = rows[np.argsort(self._lengths_np[rows], kind="stable")]
        lengths = np.maximum(self._lengths_np[rows], 1)
        real = float(lengths.sum())
        while True:
            cuts = partition_sorted(lengths, int(physical_batch_size), overhead_tokens)
            computed = sum((stop - start) * float(lengths[stop - 1]) for start, stop in cuts)
            if overhead_tokens <= 0 or real >= min_efficiency * computed:
                break
            overhead_tokens //= 2
        out = []
        for start, stop in cuts:
            chunk = rows[start:stop]
            width = int(lengths[stop - 1])
            out.append(
                MicroBatch(
                    self._slice(chunk, width),
                    int(chunk.size),
                    int(self._lengths_np[chunk].sum()),
                    int(chunk.size) * width,
                )
            )
        return out


def partition_sorted(lengths: np.ndarray, max_size: int, overhead_tokens: int = 0) -> list[tuple[int, int]]:
    """Optimal cut of ascending ``lengths`` into consecutive chunks of at most ``max_size``.

    Minimises ``sum_j (n_j * max(chunk_j) + overhead_tokens)`` exactly by dynamic programming:
    ``cost[i] = min_{i - max_size <= k < i} cost[k] + (i - k) * lengths[i - 1] + overhead``
    (the chunk ``[k, i)`` is padded to its last, longest, element). ``O(n * max_size)`` with the
    inner minimum vectorised; a logical batch of 4,096 takes a few milliseconds.

    Returns
    -------
    list of (start, stop)
        Half-open index ranges covering ``0 .. len(lengths)`` in order.
    """
    n = int(len(lengths))
    if n == 0:
        return []
    lens = np.asarray(lengths, dtype=np.float64)
    if overhead_tokens <= 0 and n <= max_size and lens[0] == lens[-1]:
        return [(0, n)]
    cost = np.zeros(n + 1)
    back = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        lo = max(0, i - max_size)
        ks = np.arange(lo, i)
        vals = cost[lo:i] + (i - ks) * lens[i - 1]
        j = int(np.argmin(vals))
        cost[i] = vals[j] + overhead_tokens
        back[i] = lo + j
    cuts = []
    i = n
    while i > 0:
        cuts.append((int(back[i]), i))
        i = int(back[i])
    return cuts[::-1]


def _pad_rows(rows: list[list[int]], width: int, value: int, side: str) -> torch.Tensor:
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        if not row:
            continue
        if side == "right":
            out[i, : len(row)] = row
        else:
            out[i, width - len(row) :] = row
    return torch.from_numpy(out)


def pack_dataset(dataset: Any, tokenizer: Any) -> PackedDataset:
    """Pad a tokenized dataset (rows of token lists and a label) once into tensors.

    Padding values and side are the tokenizer's (``pad_token_id``, ``pad_token_type_id``, 0 for
    the attention mask; ``tokenizer.padding_side``), exactly as ``DataCollatorWithPadding``
    pads, so a micro-batch equals the collator's batch of the same rows.

    Parameters
    ----------
    dataset : datasets.Dataset or sequence of dicts
        From :func:`fedtune.data.tokenize.tokenize_dataset`: ``input_ids`` (required),
        ``attention_mask``, ``token_type_ids``, ``labels``.
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer.
    """
    names = list(getattr(dataset, "column_names", None) or (dataset[0].keys() if len(dataset) else []))
    if "input_ids" not in names:
        raise ValueError(f"a tokenized dataset needs an 'input_ids' column, got columns {names}")
    side = getattr(tokenizer, "padding_side", "right") or "right"
    pad_values = {
        "input_ids": getattr(tokenizer, "pad_token_id", None),
        "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0),
        "attention_mask": 0,
    }
    if pad_values["input_ids"] is None:
        raise ValueError("the tokenizer has no pad token id; set tokenizer.pad_token first")

    def column(name: str) -> list[Any]:
        if hasattr(dataset, "column_names"):
            return list(dataset[name])
        return [row[name] for row in dataset]

    ids = column("input_ids")
    lengths = torch.tensor([len(r) for r in ids], dtype=torch.long)
    if "attention_mask" in names:
        lengths = torch.tensor([int(sum(m)) for m in column("attention_mask")], dtype=torch.long)
    width = max(1, max((len(r) for r in ids), default=1))
    columns: dict[str, torch.Tensor] = {}
    for name in names:
        values = ids if name == "input_ids" else column(name)
        if values and isinstance(values[0], (list, tuple)):
            columns[name] = _pad_rows([list(v) for v in values], width, int(pad_values.get(name, 0) or 0), side)
        else:
            columns["labels" if name == "label" else name] = torch.as_tensor(np.asarray(values))
    return PackedDataset(columns, lengths, side)


def activation_bytes_per_token(model_config: Any, sequence_length: int, element_bytes: int = 4) -> int:
    """Activation memory of one token through a transformer encoder, for the backward pass.

    ``n_layers * (34 h + 5 a s) * element_bytes / 2`` bytes (Korthikanti et al. 2022, eq. 1
    per token, stated for 2-byte elements), with hidden size ``h``, attention heads ``a`` and
    sequence length ``s`` read from a Hugging Face config (``hidden_size``/``d_model``/``dim``,
    ``num_attention_heads``/``n_heads``, ``num_hidden_layers``/``n_layers``). Unknown fields
    fall back to BERT-base values, which over-estimates small models (the safe side).
    """

    def get(*names: str, default: int) -> int:
        for name in names:
            value = getattr(model_config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return default

    hidden = get("hidden_size", "d_model", "dim", "n_embd", default=768)
    heads = get("num_attention_heads", "n_heads", "n_head", "encoder_attention_heads", default=12)
    layers = get("num_hidden_layers", "n_layers", "n_layer", "num_layers", default=12)
    per_layer_16bit = 34 * hidden + 5 * heads * max(1, int(sequence_length))
    return int(layers * per_layer_16bit * element_bytes / 2)


def auto_physical_batch_size(
    model_config: Any,
    max_length: int,
    device: torch.device | str = "cpu",
    *,
    logical_batch_size: int | None = None,
    budget_bytes: int | None = None,
    element_bytes: int = 4,
) -> int:
    """Default micro-batch size ``P`` for a model, a longest example and a device.

    The largest power of two whose activations at the longest example fit the budget
    (:func:`activation_bytes_per_token` times ``P * max_length``), capped at 64 on a CPU (the
    fastest size measured on the 2-core machine: larger micro-batches pad more and run no
    faster) and 256 on a GPU, and at the logical batch size. Budget: 1 GiB on a CPU; a quarter
    of the free memory on a CUDA device.

    Parameters
    ----------
    model_config : transformers.PretrainedConfig or any object with its size fields
    max_length : int
        Longest example in tokens (the worst-case micro-batch width).
    device : torch.device or str
    logical_batch_size : int, optional
        Never return more than this.
    budget_bytes : int, optional
        Override the activation budget.
    element_bytes : int
        4 for fp32 activations, 2 under bf16 autocast.
    """
    device = torch.device(device)
    if budget_bytes is None:
        budget_bytes = _CPU_ACTIVATION_BUDGET
        if device.type == "cuda":
            try:
                free, _ = torch.cuda.mem_get_info(device)
                budget_bytes = free // 4
            except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA
                pass
    cap = _GPU_MAX_PHYSICAL if device.type == "cuda" else _CPU_MAX_PHYSICAL
    per_example = activation_bytes_per_token(model_config, max_length, element_bytes) * max(1, int(max_length))
    fit = max(1, budget_bytes // max(1, per_example))
    size = 1 << int(math.floor(math.log2(fit)))
    size = min(size, cap)
    if logical_batch_size is not None:
        size = min(size, max(1, int(logical_batch_size)))
    return max(1, size)
