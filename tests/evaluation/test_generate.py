"""Batched greedy generation (docs/design.md §7): left padding, order, stop strings, eos, max_new_tokens."""

from __future__ import annotations

import pytest
import torch

from gpart_cli.data.sft import EVAL_SUFFIX, METAMATH_TEMPLATE, format_prompt
from gpart_cli.evaluation.generate import MATH_STOPS, cut_at_stop, generate

CORPUS = ["Tom has 3 apples and eats 1 . How many are left ?", "He eats 1 so 3 - 1 = 2 . The answer is: 2",
          "Ann has 5 pens , she gives 2 away . Bob has 7 red and 4 blue cars"]
QUERIES = ["Tom has 3 apples", "Ann has 5 pens , she gives 2 away . How many are left ?", "Bob has 7 red cars",
           "He eats 1", "Bob has 7 red and 4 blue cars . Ann has 5 pens . How many are left ?"]
EOS = 2


def tiny_tokenizer():
    """A WordLevel tokenizer (BOS added, pad == eos) over the template and CORPUS words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in [METAMATH_TEMPLATE, EVAL_SUFFIX, *CORPUS] for w, _ in pre.pre_tokenize_str(text)})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=EOS, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def count_forwards(model) -> list[int]:
    """A one-element counter of lm_head calls (one per decoding step)."""
    calls = [0]
    model.lm_head.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    return [format_prompt(q, for_eval=True) for q in QUERIES]


# ---------------------------------------------------------------- cut_at_stop


def test_cut_at_stop():
    assert cut_at_stop("x = 2. The answer is: 2\n\n### Instruction:\nnext", MATH_STOPS) == "x = 2. The answer is: 2"
    assert cut_at_stop("a</s>b\n\nBelow is an instruction", MATH_STOPS) == "a"  # the earliest stop wins
    assert cut_at_stop("a<|im_end|>b", MATH_STOPS) == "a"
    assert cut_at_stop("no stop here", MATH_STOPS) == "no stop here"
    assert cut_at_stop("abc", []) == "abc"
    assert cut_at_stop("abc", [""]) == "abc"  # an empty stop string never matches
    assert cut_at_stop("STOPabc", ["STOP"]) == ""


# ---------------------------------------------------------------- generate


@pytest.mark.slow
def test_batched_left_padded_equals_one_at_a_time(tok, prompts):
    model = tiny_llama(len(tok), seed=8)  # seed 8: four distinct outputs, one ending early on eos
    lengths = {len(tok(p)["input_ids"]) for p in prompts}
    assert len(lengths) == len(prompts)  # every prompt has a different length: padding is exercised
    one = generate(model, tok, prompts, max_new_tokens=6, batch_size=1)
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == one
    assert len(set(one)) == 4 and min(len(o.split()) for o in one) < 6  # order checkable, a row stops early
    # Order: each prompt alone gives the same text as at its position in the list.
    assert [generate(model, tok, [p], max_new_tokens=6, batch_size=4)[0] for p in prompts] == one
    assert generate(model, tok, prompts[::-1], max_new_tokens=6, batch_size=3) == one[::-1]
    # Stop strings are applied per row: rows of one batch stop at different steps.
    stops = ["apples", "4"]
    assert generate(model, tok, prompts, max_new_tokens=6, batch_size=5, stop=stops) == \
        [cut_at_stop(o, stops) for o in one] == generate(model, tok, prompts, max_new_tokens=6, batch_size=1,
                                                          stop=stops)


@pytest.mark.slow
def test_max_new_tokens_respected(tok, prompts):
    model = tiny_llama(len(tok))
    long = generate(model, tok, prompts, max_new_tokens=7, batch_size=5)
    short = generate(model, tok, prompts, max_new_tokens=3, batch_size=5)
    for s, l in zip(short, long):
        assert len(s.split()) <= 3 and len(l.split()) <= 7
        assert l.split()[:len(s.split())] == s.split()  # greedy: the shorter run is a prefix
    assert max(len(l.split()) for l in long) == 7


def test_stop_string_cuts_and_ends_early(tok, prompts):
    model = tiny_llama(len(tok))
    full = generate(model, tok, prompts[:1], max_new_tokens=10, batch_size=1)[0]
    words = full.split()
    assert len(words) == 10, full
    stop = " ".join(words[2:4])  # the third and fourth generated words
    calls = count_forwards(model)
    cut = generate(model, tok, prompts[:1], max_new_tokens=10, batch_size=1, stop=[stop])[0]
    assert cut == full[:full.index(stop)]
    assert calls[0] == 4  # stopped as soon as the fourth word was generated, not after ten


def test_eos_ends_generation_and_is_not_returned(tok, prompts):
    model = tiny_llama(len(tok))

    def force_eos(module, args, logits):
        logits[..., EOS] = logits.max() + 100.0  # every step picks eos
        return logits

    model.lm_head.register_forward_hook(force_eos)
    calls = count_forwards(model)
    assert generate(model, tok, prompts[:3], max_new_tokens=10, batch_size=3) == ["", "", ""]
    assert calls[0] == 1


def test_progress_state_and_empty_input(tok, prompts):
    model = tiny_llama(len(tok)).train()
    tok.padding_side = "right"
    seen = []
    out = generate(model, tok, prompts, max_new_tokens=2, batch_size=3, on_batch=seen.append)
    assert len(out) == 5 and seen == [3, 5]
    assert model.training and tok.padding_side == "right"  # the caller's state is restored
    assert generate(model, tok, [], max_new_tokens=2, batch_size=3) == []
