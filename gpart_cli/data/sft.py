"""MetaMath-style supervised fine-tuning data for math (docs/design.md §7): prompts, (query, response) pairs, masks.

The prompt is MetaMath's Alpaca-style template; the loss covers the response (and its eos) only, as in
MetaMath's `train_math.py`, which masks every source token with -100. Dataset converters turn MetaMathQA,
GSM8K and MAWPS rows into (query, response) pairs whose responses end with MetaMath's "The answer is: N",
the marker `gpart_cli.evaluation.answers.metamath_answer` extracts at evaluation time.
"""

from __future__ import annotations

import re

import torch

from ..errors import GpartError
from .numeric_answer import mawps_reference
from .sources import require_columns

METAMATH_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\n{query}\n\n### Response:")
EVAL_SUFFIX = " Let's think step by step."
IGNORE_INDEX = -100  # torch cross-entropy's default ignore_index

_CALCULATOR = re.compile(r"<<[^>]*>>")          # GSM8K's "<<48/2=24>>" calculator annotations
_FINAL_ANSWER = re.compile(r"\n?#### *(.*?)\s*$", re.S)
_EQUATION_LHS = re.compile(r"^\s*[xX]\s*=\s*")


# ---------------------------------------------------------------- prompts


def format_prompt(query: str, for_eval: bool = False) -> str:
    """The MetaMath prompt for `query`; evaluation appends " Let's think step by step."."""
    return METAMATH_TEMPLATE.format(query=query) + (EVAL_SUFFIX if for_eval else "")


# ---------------------------------------------------------------- converters


def gsm8k_response(answer: str) -> str:
    """A GSM8K answer without calculator annotations, its "#### N" line as "The answer is: N"."""
    text = _CALCULATOR.sub("", answer)
    match = _FINAL_ANSWER.search(text)
    if match is None:
        return text.strip()
    return f"{text[:match.start()].rstrip()}\nThe answer is: {match.group(1)}".lstrip()


def mawps_response(equation: str, ans) -> str:
    """One worked line from the MAWPS equation, then "The answer is: N"."""
    value = mawps_reference(ans)
    if value is None:
        value = str(ans).strip()
    expr, n = _EQUATION_LHS.subn("", equation.strip())
    # A few equations are not "X=expr" (e.g. "(6.0+x)*(x-6.0)=189.0"): state them and the solution.
    line = f"{expr} = {value}." if n else f"Solving {expr.strip()} gives x = {value}."
    return f"{line}\nThe answer is: {value}"


def _metamathqa(rows, data) -> list[tuple[str, str]]:
    return [(q, r) for q, r in zip(rows[data.query_column], rows[data.response_column])]


def _gsm8k(rows, data) -> list[tuple[str, str]]:
    return [(q, gsm8k_response(a)) for q, a in zip(rows["question"], rows["answer"])]


def _mawps(rows, data) -> list[tuple[str, str]]:
    return [(q, mawps_response(e, a)) for q, e, a in zip(rows["original_text"], rows["equation"], rows["ans"])]


# task name -> (converter, required columns given the data section)
CONVERTERS = {
    "metamathqa": (_metamathqa, lambda data: [data.query_column, data.response_column]),
    "gsm8k": (_gsm8k, lambda data: ["question", "answer"]),
    "mawps": (_mawps, lambda data: ["original_text", "equation", "ans"]),
}


def converter(data):
    """(converter, required columns) for `data.task`, or GpartError naming the field."""
    if data.task not in CONVERTERS:
        raise GpartError(f"recipe field data.task = {data.task!r} is not an SFT dataset; use one of "
                         f"{', '.join(CONVERTERS)}")
    convert, columns = CONVERTERS[data.task]
    return convert, columns(data)


def to_pairs(rows, data, source: str = "SFT data") -> list[tuple[str, str]]:
    """(query, response) pairs of `rows` by `data.task`; GpartError on an unknown task or missing columns."""
    convert, columns = converter(data)
    require_columns(rows, columns, source)
    return convert(rows, data)


# ---------------------------------------------------------------- tokenization


def _assemble(prompt_ids: list[int], response_ids: list[int], max_length: int) -> dict | None:
    """Concatenate, mask the prompt, truncate from the right; None if no response token is left."""
    if len(prompt_ids) >= max_length or not response_ids:
        return None
    input_ids = (list(prompt_ids) + list(response_ids))[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids):]
    return {"input_ids": input_ids, "labels": labels}


def _eos_id(tokenizer) -> int:
    """The tokenizer's eos id; a response without eos would teach the model never to stop."""
    if tokenizer.eos_token_id is None:
        raise GpartError("the tokenizer has no eos token; SFT needs one to end each response")
    return tokenizer.eos_token_id


def tokenize_example(query: str, response: str, tokenizer, max_length: int) -> dict | None:
    """input_ids = prompt + " " + response + eos, labels -100 on the prompt; None if truncated away."""
    prompt_ids = tokenizer(format_prompt(query))["input_ids"]  # BOS only if the tokenizer adds it by default
    response_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]
    return _assemble(prompt_ids, response_ids, max_length)


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer, max_length: int, prompt=format_prompt) -> list[dict]:
    """`tokenize_example` over many pairs in two batched tokenizer calls (`prompt(query)` renders each prompt);
    dropped examples left out."""
    if not pairs:
        return []
    eos = _eos_id(tokenizer)
    prompts = tokenizer([prompt(q) for q, _ in pairs])["input_ids"]
    responses = tokenizer([" " + r for _, r in pairs], add_special_tokens=False)["input_ids"]
    examples = (_assemble(p, r + [eos], max_length) for p, r in zip(prompts, responses))
    return [e for e in examples if e is not None]


class SFTCollator:
    """Right-pads features into input_ids / attention_mask / labels LongTensors."""

    def __init__(self, pad_token_id: int | None):
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        """Pad to the longest sequence; the mask comes from lengths because pad may equal eos."""
        width = max(len(f["input_ids"]) for f in features)
        ids, mask, labels = [], [], []
        for f in features:
            n, pad = len(f["input_ids"]), width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            mask.append([1] * n + [0] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long)}
