"""Chat and instruction data for SFT: rows as chat turns, rendered by a prompt template or the tokenizer's own chat
template, with the loss on the assistant tokens only.

Row formats (`data.format`):
- pairs: (query, response) from `data.task`'s converter (MetaMathQA, GSM8K, MAWPS): the MetaMath path of `sft`.
- alpaca: Stanford Alpaca's instruction / input / output columns (input may be empty or absent).
- messages: one column of chat turns, [{role, content}, ...] (ShareGPT's {from, value} also reads).

Rendering (`data.chat_template`, the one field that says how rows become text):
- auto: `chat` for alpaca and messages rows when the tokenizer has a chat template, otherwise `metamath`, so
  every pairs recipe keeps MetaMath's prompt.
- chat: `tokenizer.apply_chat_template` (an error when the tokenizer has none).
- none: the user's text as it is, then " " + the response + eos.
- metamath: MetaMath's Alpaca-style prompt (`sft.METAMATH_TEMPLATE`).
- question_answer: the authors' math prompt, "Question: {q}\\nAnswer:" (SamsungLabs/GPart,
  src/scripts/math/finetune_metamath.py and eval_math.py; their optional system prompt is off by default there).
  The authors also supervise the question; gpart keeps the loss on the answer only, as for every template.

The run records a fingerprint of its rendering (`Rendering.fingerprint`: sha256 of a probe conversation rendered
for training and for evaluation) in its task metadata; `gpart eval` renders the same way and warns on drift.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import GpartError
from .sft import EVAL_SUFFIX, IGNORE_INDEX, METAMATH_TEMPLATE, to_pairs, tokenize_pairs

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_ALPACA = ("instruction", "input", "output")
# The probe a rendering is fingerprinted on: any change in how it renders shows in the hash.
PROBE = [{"role": "user", "content": "What is 6 times 7?"},
         {"role": "assistant", "content": "6 times 7 is 42.\nThe answer is: 42"}]


@dataclass(frozen=True)
class PromptTemplate:
    """A plain-text prompt around one user message; the response follows after a space, then eos."""

    text: str                 # with {query}
    eval_suffix: str = ""     # appended to evaluation prompts (MetaMath's " Let's think step by step.")
    stops: tuple = ()         # extra stop strings for generation

    def prompt(self, query: str, for_eval: bool = False) -> str:
        return self.text.format(query=query) + (self.eval_suffix if for_eval else "")


TEMPLATES = {
    "none": PromptTemplate("{query}"),
    "metamath": PromptTemplate(METAMATH_TEMPLATE, EVAL_SUFFIX),
    # eval_math.py stops at "Question"; a new line before it keeps "Question" inside a solution from cutting it.
    "question_answer": PromptTemplate("Question: {query}\nAnswer:", "", ("\nQuestion:",)),
}


# ---------------------------------------------------------------- rows -> conversations


def _turn(raw, source: str, row: int) -> dict:
    """One chat turn as {role, content}; GpartError naming the row otherwise."""
    if isinstance(raw, dict):
        role = raw.get("role", _SHAREGPT_ROLES.get(raw.get("from")))
        content = raw.get("content", raw.get("value"))
        if role in ROLES and isinstance(content, str):
            return {"role": role, "content": content}
    raise GpartError(f"{source}: row {row} has the turn {raw!r}; each turn should be {{\"role\": system|user|"
                     f"assistant, \"content\": text}} (or ShareGPT's {{\"from\": human|gpt, \"value\": text}})")


def _messages(turns, source: str, row: int) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise GpartError(f"{source}: row {row} holds {type(turns).__name__} in the messages column; it should be a "
                         f"list of chat turns")
    out = [_turn(t, source, row) for t in turns]
    if not any(t["role"] == "assistant" for t in out):
        raise GpartError(f"{source}: row {row} has no assistant turn: nothing to learn from it")
    return out


def _alpaca(rows) -> list[list[dict]]:
    inputs = rows["input"] if "input" in rows.column_names else [""] * len(rows)
    out = []
    for instruction, extra, output in zip(rows["instruction"], inputs, rows["output"]):
        user = instruction if not (extra or "").strip() else f"{instruction}\n\n{extra}"
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    return out


def required_columns(data) -> list[str] | None:
    """The columns `data.format` reads; None for pairs (the task's converter knows its own)."""
    if data.format == "alpaca":
        return ["instruction", "output"]
    if data.format == "messages":
        return [data.messages_column]
    return None


def to_conversations(rows, data, source: str) -> list[list[dict]]:
    """Each row as a list of chat turns, by `data.format`."""
    if data.format == "pairs":
        return [[{"role": "user", "content": q}, {"role": "assistant", "content": r}]
                for q, r in to_pairs(rows, data, source)]
    if data.format == "alpaca":
        return _alpaca(rows)
    return [_messages(turns, source, i) for i, turns in enumerate(rows[data.messages_column])]


# ---------------------------------------------------------------- rendering


def _single_turn(turns: list[dict]) -> tuple[str, str]:
    """(prompt query, response) of [system?, user, assistant]; the system text goes before the query."""
    roles = [t["role"] for t in turns]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise GpartError(f"a plain prompt template renders one user turn and one assistant reply, not turns "
                         f"{roles}; use data.chat_template: auto with a tokenizer that has a chat template")
    system = turns[0]["content"] + "\n\n" if roles[0] == "system" else ""
    return system + turns[-2]["content"], turns[-1]["content"]


def _strip_bos(text: str, tokenizer) -> str:
    """A rendered chat prompt without its leading BOS text when the tokenizer adds BOS itself (no double BOS)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.bos_token_id in tokenizer("")["input_ids"]:
        return text[len(bos):]
    return text


@dataclass(frozen=True)
class Rendering:
    """How conversations become token ids and labels, and how evaluation prompts look.

    `template` is a plain `PromptTemplate`, or None for the tokenizer's chat template (`name` "chat").
    """

    name: str
    template: PromptTemplate | None

    # ---- training ----
    def tokenize(self, conversations: list[list[dict]], tokenizer, max_length: int) -> list[dict]:
        """input_ids / labels per conversation (labels -100 off the assistant tokens); truncated-away ones left out."""
        if self.template is None:
            examples = (_chat_example(turns, tokenizer, max_length) for turns in conversations)
            return [e for e in examples if e is not None]
        return tokenize_pairs([_single_turn(turns) for turns in conversations], tokenizer, max_length,
                              self.template.prompt)

    def training_text(self, turns: list[dict], tokenizer) -> str:
        """The text one conversation trains on (what `tokenize` encodes)."""
        if self.template is None:
            return tokenizer.apply_chat_template(turns, tokenize=False)
        query, response = _single_turn(turns)
        return f"{self.template.prompt(query)} {response}{tokenizer.eos_token or ''}"

    # ---- evaluation ----
    def eval_prompt(self, query: str, tokenizer) -> str:
        """The prompt generation starts from for one question."""
        if self.template is None:
            text = tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                                 add_generation_prompt=True)
            return _strip_bos(text, tokenizer)
        return self.template.prompt(query, for_eval=True)

    def stops(self, tokenizer, base: list[str]) -> list[str]:
        """`base` stop strings plus this rendering's own (the template's, or the chat tokenizer's eos text)."""
        extra = list(self.template.stops) if self.template is not None else [tokenizer.eos_token or ""]
        return list(base) + [s for s in extra if s and s not in base]

    def fingerprint(self, tokenizer) -> dict:
        """{name, sha256} of the probe conversation rendered for training and for evaluation."""
        text = self.training_text(PROBE, tokenizer) + "\x00" + self.eval_prompt(PROBE[0]["content"], tokenizer)
        return {"name": self.name, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def resolve_rendering(data, tokenizer) -> Rendering:
    """The rendering a data section asks for with this tokenizer (see the module docstring for `auto`)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    choice = data.chat_template
    if choice == "auto":
        choice = "chat" if data.format != "pairs" and has_chat else "metamath"
    if choice == "chat":
        if not has_chat:
            raise GpartError("data.chat_template: chat needs a tokenizer with a chat template, and this model's has "
                             "none; use auto, metamath, question_answer or none")
        return Rendering("chat", None)
    if choice not in TEMPLATES:
        raise GpartError(f"recipe field data.chat_template = {choice!r} is not one of auto, chat, "
                         f"{', '.join(TEMPLATES)}")
    return Rendering(choice, TEMPLATES[choice])


def default_rendering() -> Rendering:
    """What evaluation renders without a recorded SFT recipe: MetaMath's prompt."""
    return Rendering("metamath", TEMPLATES["metamath"])


# ---------------------------------------------------------------- chat-template tokenization


def _assistant_spans(turns: list[dict], text: str, tokenizer) -> list[tuple[int, int]]:
    """Character spans of `text` (the whole rendered conversation) that each assistant turn adds, end-of-turn included.

    The text a turn adds is the difference between the conversation rendered through it and rendered up to its
    generation prompt; a template whose earlier turns change when a later one is added cannot be masked this way.
    """
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        if i == 0:
            raise GpartError("a conversation starts with an assistant turn; put a user turn before it")
        before = tokenizer.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(turns[:i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise GpartError("the tokenizer's chat template renders earlier turns differently once a later turn is "
                             "added (e.g. it drops reasoning from past replies), so the assistant tokens cannot be "
                             "found; split the conversations into one reply each, or set data.chat_template to a "
                             "plain template")
        spans.append((len(before), len(through)))
    return spans


def _chat_example(turns: list[dict], tokenizer, max_length: int) -> dict | None:
    """One conversation through the chat template: labels on the tokens that start inside an assistant span."""
    if not getattr(tokenizer, "is_fast", False):
        raise GpartError("chat-template SFT needs a fast tokenizer (character offsets find the assistant tokens); "
                         "this model's tokenizer is a slow one")
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    spans = _assistant_spans(turns, text, tokenizer)
    # The rendered text carries the template's own special tokens (BOS included): add none.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
              for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------- packing


class PackingCollator:
    """A batch as one row without padding: transformers' `DataCollatorWithFlattening` (position ids restart at each
    example, so attention stays within it; each example's first label is masked). The batch carries
    use_cache=False, which the forward needs for that (see below)."""

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: list[dict]) -> dict:
        batch = self.flatten([{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in features])
        # transformers builds the per-example (block-diagonal) mask from position_ids only without a KV cache;
        # a causal LM makes one by default, even in training, and then attends across examples.
        return {**batch, "use_cache": False}
