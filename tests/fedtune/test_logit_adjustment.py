"""Logit adjustment against label skew (``--logit-adjustment``): the offset from a client's label counts,
the adjusted loss on the real all-MiniLM-L6-v2, its effect on a one-label client's update (with and
without Opacus), and the settings refused. The private release of the counts: tests/client/test_label_release.py."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedtune.batching import PackedDataset
from fedtune.cliargs import add_run_options, config_from_args
from fedtune.config import RunConfig
from fedtune.model import LoraSettings, build_peft_model, get_trainable_state, load_model_and_tokenizer
from fedtune.train import TrainConfig, _loss, label_counts, logit_adjustment, train_local

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_offset_is_tau_times_the_log_of_the_smoothed_label_shares() -> None:
    # labels 0, 0, 0, 1: add-one smoothed shares (3 + 1) / 6 and (1 + 1) / 6
    counts = label_counts([0, 0, 0, 1], 2)
    assert counts.tolist() == [3.0, 1.0]
    offset = logit_adjustment(counts, 0.5)
    torch.testing.assert_close(offset, torch.tensor([0.5 * math.log(4 / 6), 0.5 * math.log(2 / 6)]))
    # a label never seen gets a finite offset, log(1 / (n + K)); three labels, one missing
    torch.testing.assert_close(
        logit_adjustment(label_counts(torch.tensor([2, 2, 0]), 3), 1.0),
        torch.tensor([math.log(2 / 6), math.log(1 / 6), math.log(3 / 6)]),
    )
    assert torch.equal(logit_adjustment([0.0, 2.0], 0.0), torch.zeros(2))
    # noisy counts (a private release) may come out negative: clamped at 0 before smoothing
    torch.testing.assert_close(logit_adjustment([-3.2, 9.0], 1.0), torch.tensor([math.log(1 / 11), math.log(10 / 11)]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: label_counts([0, 2], 2), r"labels must be in \[0, 2\), got values from 0 to 2"),
        (lambda: label_counts([-1, 0], 2), r"labels must be in \[0, 2\)"),
        (lambda: label_counts([0], 1), "num_labels must be an integer >= 2, got 1"),
        (lambda: logit_adjustment([1.0, 2.0], -0.5), "tau must be a finite number >= 0, got -0.5"),
        (lambda: logit_adjustment([1.0, 2.0], math.nan), "tau must be a finite number >= 0, got nan"),
        (lambda: logit_adjustment([1.0, 2.0], True), "tau must be a finite number >= 0, got True"),
        (lambda: logit_adjustment([4.0], 1.0), r"counts must be at least 2 finite numbers .* got \[4.0\]"),
        (lambda: logit_adjustment([4.0, math.inf], 1.0), "counts must be at least 2 finite numbers"),
    ],
)
def test_bad_offsets_are_refused(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture(scope="module")
def model_and_data(glue_dir: Path) -> tuple[nn.Module, PackedDataset]:
    from fedtune.batching import pack_dataset
    from fedtune.data.glue import load_glue
    from fedtune.data.tokenize import tokenize_dataset

    base, tokenizer = load_model_and_tokenizer(None, 2, seed=0, pooling="mean")
    data = load_glue("sst2", glue_dir, seed=0, max_train_examples=64, max_eval_examples=8)
    model = build_peft_model(base, LoraSettings(rank=4), seed=0)
    return model, pack_dataset(tokenize_dataset(data.train, tokenizer, data.spec, max_length=32), tokenizer)


def _one_label(data: PackedDataset, label: int) -> PackedDataset:
    """The examples of ``data`` that carry ``label``: a client with all its data in one class."""
    keep = data.columns["labels"] == label
    return PackedDataset({k: v[keep] for k, v in data.columns.items()}, data.lengths[keep], data.padding_side)


def test_the_adjusted_loss_is_the_cross_entropy_of_the_shifted_logits(
    model_and_data: tuple[nn.Module, PackedDataset],
) -> None:
    model, data = model_and_data
    model.eval()
    batch = data.micro_batches(torch.arange(16), 16)[0].batch
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        offset = torch.tensor([0.3, -2.0])
        expected = -torch.log_softmax(logits + offset, dim=-1).gather(1, batch["labels"][:, None]).mean()
        torch.testing.assert_close(_loss(model, batch, offset), expected)
        # a zero offset is the model's own loss
        torch.testing.assert_close(_loss(model, batch, torch.zeros(2)), _loss(model, batch), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'labels' column"):
        _loss(model, {k: v for k, v in batch.items() if k != "labels"}, offset)


@pytest.mark.parametrize("private", [False, True], ids=["non-private", "dp-clipping-only"])
def test_a_one_label_client_barely_moves_the_model_once_its_logits_are_adjusted(
    model_and_data: tuple[nn.Module, PackedDataset], private: bool
) -> None:
    """On a shard of negatives only, the plain loss drives the head toward 'negative'; the adjusted loss,
    with this shard's own prior (positive share 1 / (n + 2)), is already near zero there, so SGD moves the
    trainable weights by a small fraction of the plain update. Under Opacus (sigma = 0: clipping, no
    noise) the offset reaches the per-sample gradients the same way."""
    model, data = model_and_data
    negatives = _one_label(data, 0)
    config = TrainConfig(
        batch_size=8,
        steps=3,
        learning_rate=0.5,
        optimizer="sgd",
        seed=1,
        noise_multiplier=0.0 if private else None,
        max_grad_norm=1.0,
        dp_randomness="seeded",
    )
    offset = logit_adjustment(label_counts(negatives.columns["labels"], 2), 1.0)
    assert offset[1] < offset[0] - 3.0  # log(1 / (n + 2)) for the label the shard never has

    def moved(logit_offset: torch.Tensor | None) -> tuple[float, float]:
        before = get_trainable_state(model)
        result = train_local(model, negatives, None, config, CPU, logit_offset=logit_offset)
        change = math.sqrt(sum(float((result.state[k] - v).pow(2).sum()) for k, v in before.items()))
        return change, result.mean_loss

    plain, plain_loss = moved(None)
    adjusted, adjusted_loss = moved(offset)
    assert plain > 1e-3
    assert adjusted < 0.3 * plain, (adjusted, plain)  # measured 0.12 (plain SGD), 0.20 (clipped)
    assert adjusted_loss < 0.25 * plain_loss


def test_train_local_refuses_an_offset_that_is_not_a_finite_vector(
    model_and_data: tuple[nn.Module, PackedDataset],
) -> None:
    model, data = model_and_data
    config = TrainConfig(batch_size=8, steps=1)
    for bad in (torch.tensor([[0.0, 1.0]]), torch.tensor([0.0, math.inf])):
        with pytest.raises(ValueError, match="logit_offset must be a finite 1-d tensor"):
            train_local(model, data, None, config, CPU, logit_offset=bad)


def test_settings_refused_with_the_value_and_the_range() -> None:
    with pytest.raises(ValueError, match="logit_adjustment must be a finite number >= 0, got -1"):
        RunConfig(task="sst2", logit_adjustment=-1.0)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match=rf"label_count_noise must be in \(0, inf\), got {bad!r}"):
            RunConfig(task="sst2", logit_adjustment=1.0, label_count_noise=bad)
    assert RunConfig(task="sst2", epsilon=8.0, logit_adjustment=1.0).label_count_noise == 20.0


def test_the_command_line_option_reaches_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_run_options(parser, federated=True)
    args: Any = parser.parse_args(["--task", "sst2", "--logit-adjustment", "1.5", "--label-count-noise", "7"])
    config = config_from_args(args)
    assert (config.logit_adjustment, config.label_count_noise) == (1.5, 7.0)
    # the Flower run config (strings and ints from pyproject / --run-config) is coerced too
    assert RunConfig.from_flower({"task": "sst2", "epsilon": "inf", "logit-adjustment": 1}).logit_adjustment == 1.0
