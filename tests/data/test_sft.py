"""MetaMath-style SFT data (docs/design.md §7): prompts, converters, label masks, truncation, collation, splits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from gpart_cli.data.sft import (
    EVAL_SUFFIX,
    METAMATH_TEMPLATE,
    SFTCollator,
    format_prompt,
    gsm8k_response,
    mawps_response,
    to_pairs,
    tokenize_example,
)
from gpart_cli.data.sft_splits import build_sft_splits
from gpart_cli.data.sources import load_rows
from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import DataSection

ASSETS = Path(__file__).resolve().parents[3] / "shared" / "assets"
CORPUS = ["Tom has 3 apples and eats 1 . How many are left ?", "He eats 1 so 3 - 1 = 2 . The answer is: 2",
          "Ann has 5 pens , she gives 2 away"]
UNK, BOS, EOS = 0, 1, 2


def tiny_tokenizer(add_bos: bool = True):
    """A WordLevel tokenizer over the template and CORPUS words; pad is the SAME id as eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in [METAMATH_TEMPLATE, EVAL_SUFFIX, *CORPUS] for w, _ in pre.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (every word must be in the vocabulary)."""
    out = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert UNK not in out, text
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------- prompts


def test_format_prompt_exact():
    assert format_prompt("What is 1+1?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 1+1?\n\n### Response:")
    assert format_prompt("Q", for_eval=True) == format_prompt("Q") + " Let's think step by step."


# ---------------------------------------------------------------- converters


def test_gsm8k_first_training_row():
    rows = load_rows([str(ASSETS / "gsm8k" / "train.jsonl")], None, None, "train").select(range(1))
    pairs = to_pairs(rows, DataSection(family="sft", task="gsm8k"))
    assert pairs == [(
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
        "The answer is: 72")]


def test_gsm8k_response_edge_cases():
    assert gsm8k_response("Cost $<<2*5=10>>10.\n#### 1,000") == "Cost $10.\nThe answer is: 1,000"
    assert gsm8k_response("#### 7") == "The answer is: 7"
    assert gsm8k_response("no marker <<1+1=2>>2") == "no marker 2"


def test_mawps_first_training_row():
    rows = load_rows([str(ASSETS / "mawps" / "trainset.json")], None, None, "train").select(range(2))
    pairs = to_pairs(rows, DataSection(family="sft", task="mawps"))
    assert pairs[0] == (
        "A waiter had 22 customers in his section . If 14 of them left and the rest of his tables had 4 people "
        "at each table , how many tables did he have ?",
        "((22.0-14.0)/4.0) = 2.\nThe answer is: 2")
    assert pairs[1][1] == "3*6 = 18.\nThe answer is: 18"  # lower-case "x=" is stripped too


def test_mawps_response_variants():
    assert mawps_response("X=(1.0/3.0)", "0.3333333333333333") == \
        "(1.0/3.0) = 0.3333333333333333.\nThe answer is: 0.3333333333333333"
    assert mawps_response("X=12.50*2", 25.0) == "12.50*2 = 25.\nThe answer is: 25"
    assert mawps_response("(6.0+x)*(x-6.0)=189.0", 15.0) == \
        "Solving (6.0+x)*(x-6.0)=189.0 gives x = 15.\nThe answer is: 15"


def test_metamathqa_uses_configured_columns():
    import datasets

    rows = datasets.Dataset.from_list([{"q": "Tom has 3 apples", "r": "The answer is: 2", "type": "x"}])
    data = DataSection(family="sft", task="metamathqa", query_column="q", response_column="r")
    assert to_pairs(rows, data) == [("Tom has 3 apples", "The answer is: 2")]


def test_unknown_task_names_field():
    import datasets

    with pytest.raises(GpartError, match=r"data\.task = 'sst2'.*metamathqa, gsm8k, mawps"):
        to_pairs(datasets.Dataset.from_list([{"a": 1}]), DataSection(family="sft", task="sst2"))


# ---------------------------------------------------------------- tokenization


def test_tokenize_example_masks_prompt_keeps_eos(tok):
    query, response = "Tom has 3 apples", "The answer is: 2"
    prompt = tok(format_prompt(query))["input_ids"]
    assert prompt[0] == BOS and UNK not in prompt
    resp = ids(tok, response)
    assert resp == tok.convert_tokens_to_ids(["The", "answer", "is", ":", "2"])
    ex = tokenize_example(query, response, tok, max_length=512)
    assert ex["input_ids"] == prompt + resp + [EOS]
    assert ex["labels"] == [-100] * len(prompt) + resp + [EOS]
    assert tok.pad_token_id == tok.eos_token_id == ex["labels"][-1]  # pad == eos, still in the loss


def test_tokenize_example_no_bos_when_tokenizer_adds_none():
    plain = tiny_tokenizer(add_bos=False)
    ex = tokenize_example("Tom has 3 apples", "The answer is: 2", plain, max_length=512)
    prompt = plain(format_prompt("Tom has 3 apples"))["input_ids"]
    assert BOS not in ex["input_ids"] and ex["input_ids"][:len(prompt)] == prompt
    assert ex["input_ids"] == prompt + ids(plain, "The answer is: 2") + [EOS]


def test_truncation_from_the_right_and_drop(tok):
    query, response = "Tom has 3 apples", "The answer is: 2"
    n_prompt = len(tok(format_prompt(query))["input_ids"])
    resp = ids(tok, response)
    ex = tokenize_example(query, response, tok, max_length=n_prompt + 3)
    assert len(ex["input_ids"]) == n_prompt + 3
    assert ex["labels"] == [-100] * n_prompt + resp[:3]  # eos cut off with the tail
    one = tokenize_example(query, response, tok, max_length=n_prompt + 1)
    assert one["labels"][-1] == resp[0] and one["labels"].count(-100) == n_prompt
    assert tokenize_example(query, response, tok, max_length=n_prompt) is None
    assert tokenize_example(query, response, tok, max_length=3) is None


# ---------------------------------------------------------------- collation


def test_collator_pads_by_length_not_by_id():
    features = [{"input_ids": [1, 7, 8, EOS, EOS], "labels": [-100, -100, 8, EOS, EOS]},
                {"input_ids": [1, 9, EOS], "labels": [-100, 9, EOS]}]
    batch = SFTCollator(pad_token_id=EOS)(features)
    assert {k: v.dtype for k, v in batch.items()} == {k: torch.long for k in ("input_ids", "attention_mask", "labels")}
    assert batch["input_ids"].tolist() == [[1, 7, 8, EOS, EOS], [1, 9, EOS, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 8, EOS, EOS], [-100, 9, EOS, -100, -100]]


# ---------------------------------------------------------------- splits


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def sft_data(files: list[str], **kw) -> DataSection:
    return dataclasses.replace(DataSection(family="sft", task="metamathqa", train_files=files, max_length=512), **kw)


@pytest.fixture
def ten_rows(tmp_path):
    rows = [{"query": f"Tom has {n} apples", "response": f"He eats 1 . The answer is: {n}"}
            for n in (1, 2, 3, 5, 1, 2, 3, 5, 1, 2)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_build_sft_splits_counts_and_items(ten_rows, tok):
    splits = build_sft_splits(sft_data([ten_rows], dev_samples=3), tok, seed=0)
    assert (len(splits.train), len(splits.dev), splits.eval) == (7, 3, None)
    assert splits.labels is None and splits.num_labels is None
    item = splits.train[0]
    assert sorted(item) == ["input_ids", "labels"] and isinstance(item["input_ids"], list)
    batch = splits.collate([splits.train[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum().item() == sum(len(splits.train[i]["input_ids"]) for i in range(3))
    by_fraction = build_sft_splits(sft_data([ten_rows], dev_fraction=0.2), tok, seed=0)
    assert (len(by_fraction.train), len(by_fraction.dev)) == (8, 2)
    none = build_sft_splits(sft_data([ten_rows], dev_fraction=0.0), tok, seed=0)
    assert (len(none.train), none.dev) == (10, None)


def test_build_sft_splits_dev_is_seeded(ten_rows, tok):
    def dev_ids(seed):
        return [tuple(x) for x in build_sft_splits(sft_data([ten_rows], dev_samples=4), tok, seed).dev["input_ids"]]

    assert dev_ids(0) == dev_ids(0)
    assert sorted(dev_ids(0)) != sorted(dev_ids(1))


def test_build_sft_splits_drops_truncated_examples(tmp_path, tok):
    rows = [{"query": "Tom has 3 apples", "response": "The answer is: 2"}] * 5
    rows.append({"query": " ".join(["apples"] * 400), "response": "The answer is: 2"})  # prompt > max_length
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    splits = build_sft_splits(sft_data([path], dev_fraction=0.0, max_length=64), tok, seed=0)
    assert len(splits.train) == 5
    with pytest.raises(GpartError, match=r"truncated away.*data\.max_length = 8"):
        build_sft_splits(sft_data([path], dev_fraction=0.0, max_length=8), tok, seed=0)


def test_build_sft_splits_missing_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "#### 1"}] * 4)
    with pytest.raises(GpartError) as err:
        build_sft_splits(sft_data([path], dev_samples=1), tok, seed=0)
    msg = str(err.value)
    assert path in msg and "lacks column(s) query, response" in msg and "found question, answer" in msg


def test_build_sft_splits_bad_template(ten_rows, tok):
    with pytest.raises(GpartError, match=r"data\.chat_template = 'chatml' is not one of auto, chat, none, metamath, "
                                         r"question_answer"):
        build_sft_splits(sft_data([ten_rows], chat_template="chatml"), tok, seed=0)
    with pytest.raises(GpartError, match=r"data\.chat_template: chat needs a tokenizer with a chat template"):
        build_sft_splits(sft_data([ten_rows], chat_template="chat"), tok, seed=0)
