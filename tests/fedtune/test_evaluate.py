"""Tests of fedtune.evaluate on the real model and real SST-2 / CoLA dev examples."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedtune.evaluate import evaluate
from fedtune.model import LoraSettings, build_peft_model, load_model_and_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(glue_dir: Path) -> dict[str, Any]:
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import make_collator, tokenize_dataset

    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0)
    model = build_peft_model(base, LoraSettings())
    sst2 = load_glue("sst2", glue_dir, seed=0, max_train_examples=10, max_eval_examples=48)
    cola = load_glue("cola", glue_dir, seed=0, max_train_examples=10, max_eval_examples=64)
    return {
        "model": model,
        "collator": make_collator(tokenizer),
        "sst2": tokenize_dataset(sst2.eval, tokenizer, sst2.spec),
        "cola": tokenize_dataset(cola.eval, tokenizer, cola.spec),
    }


def _reference(model: nn.Module, dataset: Any, collator: Any) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for i in range(len(dataset)):  # one example at a time: no padding at all
            batch = collator([dataset[i]])
            logits.append(
                model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"),
                ).logits[0]
            )
            labels.append(batch["labels"][0])
    return torch.stack(logits), torch.stack(labels)


def test_loss_and_accuracy_match_a_direct_computation(setup: dict[str, Any]) -> None:
    model, data = setup["model"], setup["sst2"]
    model.train()
    result = evaluate(model, data, setup["collator"], "sst2", CPU, batch_size=32)
    assert model.training  # mode restored
    logits, labels = _reference(model, data, setup["collator"])
    expected_loss = float(nn.functional.cross_entropy(logits, labels))
    expected_acc = float((logits.argmax(1) == labels).double().mean())
    assert result["num_examples"] == len(data) == 48
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert result["accuracy"] == pytest.approx(expected_acc, abs=1e-12)
    assert set(result) == {"loss", "num_examples", "accuracy"}


def test_batch_size_does_not_change_the_result(setup: dict[str, Any]) -> None:
    a = evaluate(setup["model"], setup["sst2"], setup["collator"], "sst2", CPU, batch_size=7)
    b = evaluate(setup["model"], setup["sst2"], setup["collator"], "sst2", CPU, batch_size=64)
    assert a["accuracy"] == b["accuracy"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_task_metrics_come_from_fedtune_data(setup: dict[str, Any]) -> None:
    result = evaluate(setup["model"], setup["cola"], setup["collator"], "cola", CPU)
    assert {"loss", "accuracy", "matthews_correlation"} <= set(result)
    assert -1.0 <= result["matthews_correlation"] <= 1.0
    assert 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["loss"])


def test_falls_back_to_accuracy_without_the_metrics_module(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    full = evaluate(setup["model"], setup["sst2"], setup["collator"], "sst2", CPU)
    monkeypatch.setitem(sys.modules, "fedtune.data.metrics", None)  # import -> ImportError
    reduced = evaluate(setup["model"], setup["sst2"], setup["collator"], "sst2", CPU)
    assert reduced["accuracy"] == full["accuracy"] and set(reduced) == {"loss", "num_examples", "accuracy"}


def test_rejects_bad_input(setup: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="batch_size.*0"):
        evaluate(setup["model"], setup["sst2"], setup["collator"], "sst2", CPU, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(setup["model"], setup["sst2"].select([]), setup["collator"], "sst2", CPU)
    with pytest.raises(ValueError, match="labels"):
        evaluate(setup["model"], setup["sst2"].remove_columns("labels"), setup["collator"], "sst2", CPU)
    labels = np.array(setup["sst2"]["labels"])
    assert set(np.unique(labels)) == {0, 1}
