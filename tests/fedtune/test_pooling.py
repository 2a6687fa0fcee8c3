"""Mean pooling (fedtune.model.apply_pooling, RunConfig.pooling) on the real all-MiniLM-L6-v2: ``auto`` picks
what the sentence-transformers folder declares, the head sees the attention-masked mean of the last hidden
states (so padding changes nothing), a deep copy pools with its own mask, Opacus DP-SGD trains through it,
and a model without a pooler or an unknown value is refused with a clear error."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedtune.config import RunConfig
from fedtune.model import (
    LoraSettings,
    MeanPooler,
    apply_pooling,
    build_peft_model,
    get_trainable_state,
    load_model_and_tokenizer,
    resolve_model_name,
    sentence_transformers_pooling,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mean_model() -> tuple[nn.Module, Any]:
    return load_model_and_tokenizer(None, 2, seed=0, pooling="auto")


def test_auto_reads_the_declared_pooling_and_model_keeps_the_bert_pooler(mean_model: tuple[nn.Module, Any]) -> None:
    assert sentence_transformers_pooling(resolve_model_name(None)) == "mean"
    assert isinstance(mean_model[0].bert.pooler, MeanPooler)
    plain, _ = load_model_and_tokenizer(None, 2, seed=0)  # the default stays the architecture's own
    assert type(plain.bert.pooler).__name__ == "BertPooler"


def test_the_head_sees_the_masked_mean_and_padding_changes_nothing(mean_model: tuple[nn.Module, Any]) -> None:
    model, tokenizer = mean_model
    model.eval()
    short, long = "a gripping, funny film", "the plot drags for two long hours and then it simply stops"
    batch = tokenizer([short, long], padding=True, return_tensors="pt")
    alone = tokenizer([short], return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short one is padded
    with torch.no_grad():
        out = model.bert(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(out.pooler_output, expected)
        torch.testing.assert_close(model(**batch).logits[0], model(**alone).logits[0], atol=1e-5, rtol=1e-4)
        # a deep copy (train_local's) pools with its own mask, not the original's
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(**batch).logits, model(**batch).logits)
        assert model.bert.pooler.mask is None and twin.bert.pooler.mask is None  # consumed by each forward
    model.train()


def test_dp_sgd_trains_through_mean_pooling(mean_model: tuple[nn.Module, Any], glue_dir: Path) -> None:
    from fedtune.batching import pack_dataset
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import tokenize_dataset
    from fedtune.train import TrainConfig, train_local

    base, tokenizer = mean_model
    data = load_glue("sst2", glue_dir, seed=0, max_train_examples=32, max_eval_examples=8)
    packed = pack_dataset(tokenize_dataset(data.train, tokenizer, data.spec, max_length=32), tokenizer)
    model = build_peft_model(copy.deepcopy(base), LoraSettings(rank=4), seed=0)
    before = get_trainable_state(model)
    config = TrainConfig(batch_size=8, steps=2, noise_multiplier=1.0, seed=1, dp_randomness="seeded")
    result = train_local(model, packed, None, config, "cpu")
    assert result.examples_seen > 0 and result.mean_loss == result.mean_loss
    moved = {k for k in before if not torch.equal(before[k], result.state[k])}
    assert any("classifier" in k for k in moved) and any("lora_B" in k for k in moved)


def test_mean_needs_a_pooler_and_bad_values_are_refused() -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "distilbert", vocab_size=100, num_labels=2, dim=32, hidden_dim=64, n_layers=1, n_heads=2
    )
    model = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(ValueError, match=r"pooling 'mean' replaces a BERT-style pooler.*\(distilbert\)"):
        apply_pooling(model, "mean")
    assert apply_pooling(model, "auto", "no-such-folder") == "model"  # nothing declared: the model's own
    with pytest.raises(ValueError, match="pooling must be one of auto, model, mean, got 'max'"):
        apply_pooling(model, "max")
    with pytest.raises(ValueError, match="pooling must be one of auto, model, mean, got 'cls'"):
        RunConfig(task="sst2", pooling="cls")
