"""Tests of fedtune.model: devices, loading, LoRA settings and wrapping, trainable state, adapters."""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedtune import model as ftm
from fedtune.model import (
    LoraSettings,
    build_peft_model,
    default_lora_targets,
    get_trainable_state,
    load_model_and_tokenizer,
    pick_device,
    resolve_model_name,
    save_adapter,
    set_trainable_state,
    state_num_bytes,
)

SENTENCES = [
    "a gripping, beautifully acted film",
    "dull and lifeless .",
    "the plot never quite comes together , but the performances are terrific",
]

# all-MiniLM-L6-v2: 6 layers x (query, value) x (A: 8x384 + B: 384x8), head 2x384 + 2.
LORA_PARAMS = 6 * 2 * (8 * 384 + 384 * 8)
HEAD_PARAMS = 2 * 384 + 2


@pytest.fixture(scope="module")
def base_and_tokenizer() -> tuple[nn.Module, object]:
    return load_model_and_tokenizer(None, 2, seed=0)


@pytest.fixture()
def peft_model(base_and_tokenizer: tuple[nn.Module, object]) -> nn.Module:
    import copy

    base, _ = base_and_tokenizer
    return build_peft_model(copy.deepcopy(base), LoraSettings())


def _randomize(model: nn.Module, seed: int = 1, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Give every trainable tensor random values (LoRA B starts at zero: make it matter)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * scale for k, v in get_trainable_state(model).items()}
    set_trainable_state(model, state)
    return state


def _logits(model: nn.Module, tokenizer: object) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------- devices and names


def test_pick_device_auto_and_cpu() -> None:
    auto = pick_device("auto")
    assert auto.type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert auto.type in {"mps", "cpu"}
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")


def test_pick_device_rejects_unknown_and_unavailable() -> None:
    with pytest.raises(ValueError, match="tpu9"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_default_model_is_the_bundled_minilm() -> None:
    path = Path(ftm.DEFAULT_MODEL)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_model_name(None) == str(path)
    assert resolve_model_name("sentence-transformers/all-MiniLM-L6-v2") == str(path)
    assert resolve_model_name(str(path)) == str(path.resolve())
    assert resolve_model_name("roberta-base") == "roberta-base"  # hub ids pass through


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="no-such-model.*not found") as info:
        load_model_and_tokenizer(str(missing), 2)
    assert info.value.__context__ is None or info.value.__suppress_context__
    assert info.traceback[-1].path.name == "model.py"  # raised by fedtune, not transformers


def test_offline_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as info:
        load_model_and_tokenizer("fedtune-tests/no-such-model", 2)
    message = str(info.value)
    assert "fedtune-tests/no-such-model" in message
    assert "not found locally and the hub cannot be reached" in message
    assert info.value.__suppress_context__  # no chained traceback from transformers
    assert info.traceback[-1].path.name == "model.py"


def test_num_labels_is_validated() -> None:
    with pytest.raises(ValueError, match="num_labels.*1"):
        load_model_and_tokenizer(None, 1)


def test_load_is_seeded_and_leaves_global_rng_alone(base_and_tokenizer: tuple[nn.Module, object]) -> None:
    base, tokenizer = base_and_tokenizer
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again, _ = load_model_and_tokenizer(None, 2, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(again.classifier.weight, base.classifier.weight)
    other, _ = load_model_and_tokenizer(None, 2, seed=1)
    assert not torch.equal(other.classifier.weight, base.classifier.weight)
    assert tokenizer.pad_token is not None


def test_minilm_pooler_loads_but_is_untrained(base_and_tokenizer: tuple[nn.Module, object]) -> None:
    """The checkpoint's pooler is a never-trained Gaussian init (see the fedtune.model notes)."""
    from safetensors import safe_open

    base, _ = base_and_tokenizer
    with safe_open(str(Path(ftm.DEFAULT_MODEL) / "model.safetensors"), "pt") as f:
        ckpt_w = f.get_tensor("pooler.dense.weight")
        ckpt_b = f.get_tensor("pooler.dense.bias")
    # It is loaded (not re-initialized) ...
    assert torch.equal(base.bert.pooler.dense.weight.detach(), ckpt_w)
    # ... but it is an untrained random matrix: zero bias, Gaussian statistics.
    assert torch.count_nonzero(ckpt_b) == 0
    x = ckpt_w.flatten().double()
    kurtosis = float(((x - x.mean()) ** 4).mean() / x.var() ** 2)
    assert abs(kurtosis - 3.0) < 0.1
    assert 0.005 < float(x.std()) < 0.02


# ---------------------------------------------------------------- LoRA settings


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rank": 0}, r"rank.*\[1, 1024\].*0"),
        ({"rank": 2.5}, r"rank.*2\.5"),
        ({"rank": True}, r"rank.*True"),
        ({"alpha": 0}, r"alpha.*> 0.*0"),
        ({"alpha": math.nan}, r"alpha.*nan"),
        ({"dropout": 1.0}, r"dropout.*\[0, 1\).*1\.0"),
        ({"dropout": -0.1}, r"dropout.*-0\.1"),
        ({"target_modules": "query"}, r"target_modules.*'query'"),
        ({"target_modules": ()}, r"target_modules.*\(\)"),
        ({"modules_to_save": ("classifier", "")}, r"modules_to_save"),
    ],
)
def test_lora_settings_validation(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        LoraSettings(**kwargs)


def test_lora_settings_defaults_and_lists_become_tuples() -> None:
    s = LoraSettings(target_modules=["query", "key"])
    assert s.target_modules == ("query", "key")
    d = LoraSettings()
    assert (d.rank, d.alpha, d.dropout, d.target_modules) == (8, 16.0, 0.0, None)
    with pytest.raises(AttributeError):
        d.rank = 4  # type: ignore[misc]


def test_unknown_architecture_lists_linear_modules() -> None:
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = types.SimpleNamespace(model_type="toy")
            self.fc_in = nn.Linear(4, 4)
            self.out_proj = nn.Linear(4, 2)

    with pytest.raises(ValueError, match="toy.*fc_in, out_proj"):
        default_lora_targets(Toy())


def test_peft_model_trains_only_adapters_and_head(peft_model: nn.Module) -> None:
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    head = [n for n in trainable if "modules_to_save" in n]
    assert len(lora) == 24 and len(head) == 2 and len(trainable) == 26
    assert all(".query." in n or ".value." in n for n in lora)
    assert all("classifier" in n for n in head)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == LORA_PARAMS + HEAD_PARAMS


def test_pooler_can_be_trained_on_request(base_and_tokenizer: tuple[nn.Module, object]) -> None:
    import copy

    base, _ = base_and_tokenizer
    model = build_peft_model(copy.deepcopy(base), LoraSettings(modules_to_save=("classifier", "pooler")))
    pooler = [n for n, p in model.named_parameters() if p.requires_grad and "pooler" in n]
    assert sorted(n.rsplit(".", 1)[-1] for n in pooler) == ["bias", "weight"]


@pytest.mark.parametrize(
    ("model_type", "extra", "targets", "heads"),
    [
        (
            "distilbert",
            {"dim": 32, "hidden_dim": 64, "n_layers": 1, "n_heads": 2},
            ("q_lin", "v_lin"),
            ("pre_classifier", "classifier"),
        ),
        (
            "roberta",
            {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
            ("query", "value"),
            ("classifier",),
        ),
        (
            "deberta-v2",
            {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
            ("query_proj", "value_proj"),
            ("pooler", "classifier"),
        ),
    ],
)
def test_default_targets_of_other_architectures(
    model_type: str, extra: dict, targets: tuple[str, ...], heads: tuple[str, ...]
) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(model_type, vocab_size=100, num_labels=2, **extra)
    model = build_peft_model(AutoModelForSequenceClassification.from_config(config), LoraSettings())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    assert adapted == set(targets)
    for head in heads:
        assert any(f"{head}.modules_to_save" in n for n in trainable), head


def test_build_peft_model_is_seeded(base_and_tokenizer: tuple[nn.Module, object]) -> None:
    import copy

    base, _ = base_and_tokenizer
    a = get_trainable_state(build_peft_model(copy.deepcopy(base), LoraSettings(), seed=3))
    b = get_trainable_state(build_peft_model(copy.deepcopy(base), LoraSettings(), seed=3))
    c = get_trainable_state(build_peft_model(copy.deepcopy(base), LoraSettings(), seed=4))
    key = next(k for k in a if "lora_A" in k)
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


# ---------------------------------------------------------------- trainable state


def test_state_holds_only_adapter_and_head(peft_model: nn.Module) -> None:
    state = get_trainable_state(peft_model)
    assert all(("lora_A" in k or "lora_B" in k or "modules_to_save" in k) for k in state)
    frozen = {n for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert not frozen & set(state)
    assert not any("embeddings" in k or "base_layer" in k or "original_module" in k for k in state)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    # 74,498 float32 parameters: 297,992 bytes travel per update (the base has 22.7M).
    assert state_num_bytes(state) == 4 * (LORA_PARAMS + HEAD_PARAMS) == 297_992
    total = sum(p.numel() for p in peft_model.parameters())
    assert state_num_bytes(state) < 0.004 * 4 * total


def test_state_is_a_copy_with_stable_order(peft_model: nn.Module) -> None:
    a = get_trainable_state(peft_model)
    b = get_trainable_state(peft_model)
    assert list(a) == list(b) == [n for n, p in peft_model.named_parameters() if p.requires_grad]
    key = next(iter(a))
    a[key].add_(1.0)
    assert not torch.equal(a[key], get_trainable_state(peft_model)[key])


def test_round_trip_is_identical(peft_model: nn.Module, base_and_tokenizer: tuple[nn.Module, object]) -> None:
    sent = _randomize(peft_model)
    got = get_trainable_state(peft_model)
    assert list(got) == list(sent)
    assert all(torch.equal(got[k], sent[k]) for k in sent)
    # numpy arrays (what Flower ships) are accepted too
    set_trainable_state(peft_model, {k: v.numpy() * 2 for k, v in got.items()})
    assert all(torch.equal(v, 2 * got[k]) for k, v in get_trainable_state(peft_model).items())


def _bad_states(state: dict[str, torch.Tensor]) -> list[tuple[str, dict, str]]:
    keys = list(state)
    lora_b, head_w = keys[1], keys[-2]
    cases = []
    missing = dict(state)
    del missing[lora_b]
    cases.append(("missing", missing, lora_b))
    extra = dict(state)
    extra["base_model.model.bert.embeddings.word_embeddings.weight"] = torch.zeros(30522, 384)
    cases.append(("unexpected", extra, "word_embeddings"))
    shape = dict(state)
    shape[lora_b] = torch.zeros(state[lora_b].shape[0] + 1, state[lora_b].shape[1])
    cases.append(("shape", shape, lora_b))
    nan = dict(state)
    nan[head_w] = state[head_w].clone()
    nan[head_w][0, 3] = float("nan")
    cases.append(("nan", nan, head_w))
    inf = dict(state)
    inf[lora_b] = state[lora_b].clone()
    inf[lora_b][5, 0] = -float("inf")
    cases.append(("inf", inf, lora_b))
    dtype = dict(state)
    dtype[lora_b] = torch.zeros(state[lora_b].shape, dtype=torch.long)
    cases.append(("dtype", dtype, lora_b))
    not_tensor = dict(state)
    not_tensor[lora_b] = [[0.0]]
    cases.append(("type", not_tensor, lora_b))
    return cases


def test_set_state_rejects_bad_updates_naming_the_key(peft_model: nn.Module) -> None:
    good = _randomize(peft_model)
    for label, bad, key in _bad_states(good):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
            set_trainable_state(peft_model, bad)
        assert label in {"missing", "unexpected", "shape", "nan", "inf", "dtype", "type"}, info
        # a rejected update leaves the model untouched
        now = get_trainable_state(peft_model)
        assert all(torch.equal(now[k], good[k]) for k in good), label
    with pytest.raises(ValueError, match="mapping"):
        set_trainable_state(peft_model, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        bad = dict(good)
        k = next(iter(good))
        bad[k] = np.full(good[k].shape, np.inf, dtype=np.float32)
        set_trainable_state(peft_model, bad)


def test_state_changes_the_logits(peft_model: nn.Module, base_and_tokenizer: tuple[nn.Module, object]) -> None:
    _, tokenizer = base_and_tokenizer
    before = _logits(peft_model, tokenizer)
    _randomize(peft_model, seed=7)
    assert not torch.allclose(before, _logits(peft_model, tokenizer))


# ---------------------------------------------------------------- adapters on disk


def test_saved_adapter_reloads_with_peft(
    peft_model: nn.Module, base_and_tokenizer: tuple[nn.Module, object], tmp_path: Path
) -> None:
    from peft import PeftModel

    _, tokenizer = base_and_tokenizer
    _randomize(peft_model, seed=11)
    expected = _logits(peft_model, tokenizer)
    out = save_adapter(peft_model, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    # a base whose head was initialized differently: the saved head must override it
    fresh_base, _ = load_model_and_tokenizer(None, 2, seed=99)
    reloaded = PeftModel.from_pretrained(fresh_base, str(out))
    torch.testing.assert_close(_logits(reloaded, tokenizer), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="peft model"):
        save_adapter(nn.Linear(2, 2), tmp_path / "x")
