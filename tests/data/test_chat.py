"""Chat and instruction SFT data (data/chat.py): formats, templates, assistant-only labels, fingerprints, packing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_llama, write_jsonl

from gpart_cli.data.chat import TEMPLATES, PackingCollator, Rendering, resolve_rendering, to_conversations
from gpart_cli.data.sft import IGNORE_INDEX, SFTCollator, format_prompt, tokenize_example
from gpart_cli.data.sft_splits import build_sft_splits
from gpart_cli.data.sources import load_rows
from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import DataSection

WORDS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "Be", "brief",
         "Hi", "Hello", "there", "Add", "2", "and", "3", "5", "Thanks", "welcome", "You", "are", "Question:",
         "Answer:", "Below", "is", "an", "instruction", "that", "describes", "a", "task.", "Write", "response",
         "appropriately", "completes", "the", "request.", "###", "Instruction:", "Response:", "Let's", "think",
         "step", "by", "step.", "numbers", "What", "6", "times", "7?", "7", "42.", "The", "answer", "42", "."]
CHATML = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
CONVERSATION = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Add 2 and 3"},
                {"role": "assistant", "content": "5"}]


def word_tokenizer(chat_template: str | None = CHATML, bos: bool = False):
    """A fast WordLevel tokenizer over WORDS (whitespace-split), optionally with a ChatML-like template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    return fast


def wid(word: str) -> int:
    return WORDS.index(word)


def data(**kw) -> DataSection:
    return DataSection(**{"family": "sft", "task": "mine", **kw})


# ---------------------------------------------------------------- label masks


def test_chat_template_labels_cover_exactly_the_assistant_tokens():
    tok = word_tokenizer()
    [example] = Rendering("chat", None).tokenize([CONVERSATION], tok, max_length=64)
    ids, labels = [], []
    for turn in CONVERSATION:
        turn_ids = [wid("<|im_start|>"), wid(turn["role"])] + [wid(w) for w in turn["content"].split()] + \
            [wid("<|im_end|>")]
        ids += turn_ids
        # the role header is the prompt; the reply and its end-of-turn token are learned
        labels += [IGNORE_INDEX] * 2 + turn_ids[2:] if turn["role"] == "assistant" else [IGNORE_INDEX] * len(turn_ids)
    assert example["input_ids"] == ids
    assert example["labels"] == labels
    assert sum(label != IGNORE_INDEX for label in labels) == 5  # "Hello there <|im_end|>" and "5 <|im_end|>"


def test_chat_truncation_cuts_from_the_right_and_drops_a_conversation_without_a_reply():
    tok = word_tokenizer()
    # system (5 tokens) + user (4) + "<|im_start|> assistant": nothing learned is left
    assert Rendering("chat", None).tokenize([CONVERSATION], tok, max_length=11) == []
    [short] = Rendering("chat", None).tokenize([CONVERSATION], tok, max_length=12)
    assert short["input_ids"][-3:] == [wid("<|im_start|>"), wid("assistant"), wid("Hello")]
    assert short["labels"] == [IGNORE_INDEX] * 11 + [wid("Hello")]


def test_plain_template_pairs_match_the_metamath_path():
    tok = word_tokenizer(chat_template=None, bos=True)
    turns = [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}]
    [example] = Rendering("metamath", TEMPLATES["metamath"]).tokenize([turns], tok, max_length=64)
    assert example == tokenize_example("Add 2 and 3", "5", tok, 64)
    assert example["labels"][-2:] == [wid("5"), wid("</s>")]
    assert set(example["labels"][:-2]) == {IGNORE_INDEX}


def test_question_answer_is_the_authors_prompt():
    qa = TEMPLATES["question_answer"]
    assert qa.prompt("What is 6 times 7?") == "Question: What is 6 times 7?\nAnswer:"
    assert qa.prompt("Q", for_eval=True) == "Question: Q\nAnswer:"  # no suffix at evaluation (eval_math.py)
    tok = word_tokenizer(chat_template=None)
    rendering = Rendering("question_answer", qa)
    [example] = rendering.tokenize([[{"role": "user", "content": "Add 2 and 3"},
                                     {"role": "assistant", "content": "5"}]], tok, 64)
    assert example["input_ids"] == [wid(w) for w in "Question: Add 2 and 3 Answer: 5 </s>".split()]
    assert example["labels"] == [IGNORE_INDEX] * 6 + [wid("5"), wid("</s>")]
    assert rendering.stops(tok, ["</s>"]) == ["</s>", "\nQuestion:"]


def test_plain_template_refuses_a_multi_turn_conversation():
    with pytest.raises(GpartError, match="one user turn and one assistant reply.*chat_template: auto"):
        Rendering("metamath", TEMPLATES["metamath"]).tokenize([CONVERSATION], word_tokenizer(None), 64)


def test_a_template_that_rewrites_past_turns_is_refused():
    tok = word_tokenizer("{% for m in messages %}{{ m['content'] }} {% endfor %}{{ messages | length }}")
    with pytest.raises(GpartError, match="renders earlier turns differently"):
        Rendering("chat", None).tokenize([CONVERSATION[1:3]], tok, 64)


# ---------------------------------------------------------------- formats


def test_alpaca_and_messages_rows(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"},
                                                {"instruction": "Hi", "input": "", "output": "Hello"}])
    convs = to_conversations(load_rows([str(alpaca)], None, None, "train"), data(format="alpaca"), "a")
    assert convs == [[{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    share = write_jsonl(tmp_path / "m.jsonl", [{"conv": [{"from": "human", "value": "Hi"},
                                                         {"from": "gpt", "value": "Hello"}]}])
    convs = to_conversations(load_rows([str(share)], None, None, "train"),
                             data(format="messages", messages_column="conv"), "m")
    assert convs == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(GpartError, match="row 0 has no assistant turn"):
        to_conversations(load_rows([str(bad)], None, None, "train"), data(format="messages"), "b")


def test_auto_uses_the_chat_template_for_chat_rows_only():
    chat, plain = word_tokenizer(), word_tokenizer(chat_template=None)
    assert resolve_rendering(data(format="messages"), chat).name == "chat"
    assert resolve_rendering(data(format="alpaca"), chat).name == "chat"
    assert resolve_rendering(data(format="pairs", task="gsm8k"), chat).name == "metamath"  # recipes keep their prompt
    assert resolve_rendering(data(format="messages"), plain).name == "metamath"
    assert resolve_rendering(data(format="messages", chat_template="none"), chat).template.prompt("Hi") == "Hi"
    assert resolve_rendering(data(format="pairs", task="gsm8k", chat_template="chat"), chat).name == "chat"


def test_eval_prompt_and_fingerprint():
    tok = word_tokenizer()
    chat = Rendering("chat", None)
    assert chat.eval_prompt("Hi", tok) == "<|im_start|> user Hi <|im_end|> <|im_start|> assistant "
    assert Rendering("metamath", TEMPLATES["metamath"]).eval_prompt("Hi", tok) == format_prompt("Hi", for_eval=True)
    first = chat.fingerprint(tok)
    assert first == chat.fingerprint(word_tokenizer()) and first["name"] == "chat" and len(first["sha256"]) == 64
    assert chat.fingerprint(word_tokenizer(CHATML.replace("<|im_end|> {% endfor", "{% endfor"))) != first
    assert Rendering("metamath", TEMPLATES["metamath"]).fingerprint(tok) != first


def test_build_sft_splits_with_messages(tmp_path):
    rows = [{"messages": CONVERSATION[1:3]}] * 6
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    tok = word_tokenizer()
    splits = build_sft_splits(data(format="messages", train_files=[str(path)], dev_samples=2), tok, seed=0)
    assert (len(splits.train), len(splits.dev)) == (4, 2)
    assert splits.train_collate is None
    assert splits.train[0]["labels"] == [IGNORE_INDEX] * 6 + [wid("Hello"), wid("there"), wid("<|im_end|>")]
    packed = build_sft_splits(data(format="messages", train_files=[str(path)], dev_samples=2, packing=True), tok, 0)
    assert isinstance(packed.train_collate, PackingCollator)
    with pytest.raises(GpartError, match="lacks column.*instruction"):
        build_sft_splits(data(format="alpaca", train_files=[str(path)]), tok, seed=0)


# ---------------------------------------------------------------- packing


def test_packing_gives_the_unpacked_loss_without_padding():
    tok = word_tokenizer()
    convs = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:], [CONVERSATION[1], {"role": "assistant",
                                                                                  "content": "You are welcome"}]]
    examples = Rendering("chat", None).tokenize(convs, tok, 64)
    model = tiny_llama(vocab=len(WORDS))
    padded = SFTCollator(tok.pad_token_id)(examples)
    packed = PackingCollator()(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert lengths == [25, 9, 11, 10]
    assert int((padded["attention_mask"] == 0).sum()) == 4 * 25 - sum(lengths) == 45  # pad tokens unpacked
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed  # none packed
    assert packed["use_cache"] is False  # else transformers attends across the packed examples
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    with torch.no_grad():
        unpacked_loss = model(**padded).loss
        packed_loss = model(**packed).loss
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=1e-6)


def test_recipe_fields_validate():
    from gpart_cli.recipe.schema import from_dict

    base = {"model": {"name_or_path": "x"}}
    with pytest.raises(GpartError, match=r"data\.format = 'sharegpt' is not one of pairs, alpaca, messages"):
        from_dict({**base, "data": {"format": "sharegpt"}})
    with pytest.raises(GpartError, match=r"data\.chat_template = 'chatml' is not one of auto"):
        from_dict({**base, "data": {"chat_template": "chatml"}})
    recipe = from_dict({**base, "data": {"family": "sft", "format": "messages", "packing": True}})
    assert dataclasses.asdict(recipe.data)["chat_template"] == "auto"


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_chat_sft_run_records_its_template_and_eval_warns_on_drift(tiny_llama_dir, tmp_path):
    import json
    import shutil

    from conftest import ASSETS, head_rows
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from gpart_cli.commands.app import app
    from gpart_cli.core.artifact import read_artifact
    from gpart_cli.recipe.schema import from_dict
    from gpart_cli.train.run import run

    chat_dir = tmp_path / "chat-llama"
    shutil.copytree(tiny_llama_dir, chat_dir)
    tok = AutoTokenizer.from_pretrained(chat_dir)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    tok.save_pretrained(chat_dir)
    rows = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in head_rows(ASSETS / "gsm8k" / "train.jsonl", 12)]
    gsm_test = str(ASSETS / "gsm8k" / "test.jsonl")
    recipe = from_dict({
        "model": {"name_or_path": str(chat_dir)},
        "method": {"name": "gpart", "d": 64, "target_modules": ["q_proj", "v_proj"]},
        "data": {"family": "sft", "task": "my_chats", "format": "messages", "packing": True,
                 "train_files": [str(write_jsonl(tmp_path / "chats.jsonl", rows))], "dev_samples": 4,
                 "max_length": 320},
        "train": {"max_steps": 2, "batch_size": 4, "lr_theta": 1e-2, "eval_before": False},
        "eval": {"task": "gsm8k", "files": [gsm_test], "limit": 2, "batch_size": 2, "max_new_tokens": 4},
        "name": "chat"})
    results = run(recipe, tmp_path / "run")
    recorded = read_artifact(tmp_path / "run" / "adapter.gpart").meta["task"]["template"]
    assert recorded == Rendering("chat", None).fingerprint(AutoTokenizer.from_pretrained(chat_dir))
    common = ["eval", "--task", "gsm8k", "--adapter", str(tmp_path / "run"), "--data", gsm_test, "--limit", "2",
              "--max-new-tokens", "4"]
    res = CliRunner().invoke(app, common + ["--model", str(chat_dir), "--output", str(tmp_path / "ev.json")])
    assert res.exit_code == 0 and "drift" not in res.output, res.output
    assert json.loads((tmp_path / "ev.json").read_text())["scores"] == results["after"]
    # the same adapter on a copy of the base whose tokenizer lost its chat template: other prompts, a warning
    res = CliRunner().invoke(app, common + ["--model", str(tiny_llama_dir), "--output", str(tmp_path / "ev2.json")])
    assert res.exit_code == 0, res.output
    assert "prompt template drift" in res.output and "trained with chat" in res.output
