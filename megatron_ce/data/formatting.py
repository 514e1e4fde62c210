"""Row layouts, prompt formats and tokenization for SFT.

Two formats:

* ``alpaca`` – the reference's prompt (docs/METHOD.md §4)::

      Below is an instruction that describes a task. Write a response that appropriately completes
      the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Response:\\n{response}

  tokenized as one text with the tokenizer's own special tokens (e.g. BOS), EOS appended. Loss on
  every token by default (``loss_on="all"``, as the reference), or on response + EOS only
  (``loss_on="response"``). Rows with a non-empty ``input`` column use the Alpaca "with input"
  prompt (``### Input:`` section); the paper's datasets have none.
* ``chat`` – the tokenizer's chat template (``apply_chat_template``), loss on assistant tokens only:
  every token of an assistant turn as the template renders it (its content plus whatever the template
  puts after it up to the next message, e.g. ``<|im_end|>`` or the eos token; a token that straddles
  the turn's start, like sentencepiece's ``▁word``, counts as the turn's). EOS is appended unless the
  last assistant turn already contains it.

A tokenized sample is ``(ids, flags)``: ``flags[j] = 1`` when token ``j`` is a loss *target* (it is
predicted from the tokens before it). The dataset turns this into shifted labels and a loss mask.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .sources import DataError

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "Example",
    "RowLayout",
    "resolve_chat_template",
    "resolve_layout",
    "row_to_example",
    "tokenize_examples",
]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)

EMPTY = "empty_response"  # row_to_example's result for a row whose response is empty


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Which columns hold what. ``kind`` is ``"alpaca"`` (instruction/response columns) or
    ``"messages"`` (a list of ``{"role", "content"}``)."""

    kind: str
    prompt_field: Optional[str] = None
    response_field: Optional[str] = None
    input_field: Optional[str] = "input"
    messages_field: Optional[str] = None
    first_turn_only: bool = False


@dataclasses.dataclass
class Example:
    location: str
    instruction: Optional[str] = None  # alpaca
    input: Optional[str] = None
    response: Optional[str] = None
    messages: Optional[List[dict]] = None  # chat


def resolve_layout(location: str, row: Any, *, preset=None, prompt_field=None, response_field=None,
                   input_field="input", messages_field=None, first_turn_only=None) -> RowLayout:
    """The layout from explicit fields, else the task preset, else the first row's keys."""
    if prompt_field or response_field:
        if not (prompt_field and response_field):
            raise ValueError("prompt_field and response_field go together")
        layout = RowLayout("alpaca", prompt_field, response_field, input_field)
    elif messages_field:
        layout = RowLayout("messages", messages_field=messages_field)
    elif preset is not None:
        if preset.messages_field:
            layout = RowLayout("messages", messages_field=preset.messages_field,
                               first_turn_only=preset.first_turn_only)
        else:
            layout = RowLayout("alpaca", preset.prompt_field, preset.response_field, input_field)
    else:
        if not isinstance(row, dict):
            raise DataError(location, f"expected a JSON object, got {type(row).__name__}")
        if "messages" in row:
            layout = RowLayout("messages", messages_field="messages")
        elif "instruction" in row and ("output" in row or "response" in row):
            layout = RowLayout("alpaca", "instruction", "output" if "output" in row else "response", input_field)
        else:
            raise DataError(location, f"cannot tell the row layout from keys {sorted(row)}: expected 'messages', "
                                      "or 'instruction' with 'output' or 'response' (or pass task / field names)")
    if first_turn_only is not None:
        layout = dataclasses.replace(layout, first_turn_only=bool(first_turn_only))
    return layout


def _field(location, row, name, *, optional=False):
    if name not in row or row[name] is None:
        if optional:
            return None
        raise DataError(location, f"missing field '{name}'")
    v = row[name]
    if not isinstance(v, str):
        raise DataError(location, f"field '{name}' must be a string, got {type(v).__name__}")
    return _valid_text(location, name, v)


def _valid_text(location, name, v: str) -> str:
    try:  # JSON "\ud800" escapes decode to lone surrogates, which no tokenizer can encode
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(location, f"field '{name}' is not valid Unicode (lone surrogate at character {e.start})") from None
    return v


def resolve_chat_template(chat_template: Optional[str]) -> Optional[str]:
    """A Jinja template string, or the contents of a ``.jinja`` file when given a file path."""
    if chat_template is not None and "{" not in chat_template and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    return chat_template


def _messages(location, row, name) -> List[dict]:
    msgs = row.get(name) if name in row else None
    if msgs is None:
        raise DataError(location, f"missing field '{name}'")
    if not isinstance(msgs, (list, tuple)):
        raise DataError(location, f"field '{name}' must be a list of messages, got {type(msgs).__name__}")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(location, f"{name}[{k}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if m.get(key) is None:
                raise DataError(location, f"{name}[{k}]: missing field '{key}'")
            if not isinstance(m[key], str):
                raise DataError(location, f"{name}[{k}]: field '{key}' must be a string, got {type(m[key]).__name__}")
            _valid_text(location, f"{name}[{k}].{key}", m[key])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _first_pair(location, msgs, name):
    u = next((k for k, m in enumerate(msgs) if m["role"] == "user"), None)
    if u is None:
        raise DataError(location, f"field '{name}' has no user message")
    a = next((k for k in range(u + 1, len(msgs)) if msgs[k]["role"] == "assistant"), None)
    if a is None:
        raise DataError(location, f"field '{name}' has no assistant message after the first user message")
    return msgs[u], msgs[a]


def row_to_example(location: str, row: Any, layout: RowLayout, fmt: str):
    """Validate one row and bring it to `fmt` ("alpaca" | "chat"). Returns an :class:`Example`, or
    ``EMPTY`` when the (used) response is empty or whitespace. Raises :class:`DataError`."""
    if not isinstance(row, dict):
        raise DataError(location, f"expected a JSON object, got {type(row).__name__}")
    if layout.kind == "alpaca":
        instruction = _field(location, row, layout.prompt_field)
        response = _field(location, row, layout.response_field)
        inp = _field(location, row, layout.input_field, optional=True) if layout.input_field else None
        if not response.strip():
            return EMPTY
        if fmt == "alpaca":
            return Example(location, instruction=instruction, input=inp or None, response=response)
        user = f"{instruction}\n\n{inp}" if inp else instruction
        return Example(location, messages=[{"role": "user", "content": user},
                                           {"role": "assistant", "content": response}])
    msgs = _messages(location, row, layout.messages_field)
    if fmt == "alpaca" or layout.first_turn_only:
        user, asst = _first_pair(location, msgs, layout.messages_field)
        if not asst["content"].strip():
            return EMPTY
        if fmt == "alpaca":
            return Example(location, instruction=user["content"], response=asst["content"])
        return Example(location, messages=[user, asst])
    assistants = [m for m in msgs if m["role"] == "assistant"]
    if not assistants:
        raise DataError(location, f"field '{layout.messages_field}' has no assistant message")
    if any(not m["content"].strip() for m in assistants):
        return EMPTY
    return Example(location, messages=msgs)


# ----------------------------------------------------------------------------------------------
# tokenization


def _is_fast(tokenizer) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def _alpaca_prompt(ex: Example) -> str:
    if ex.input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=ex.instruction, input=ex.input)
    return ALPACA_PROMPT.format(instruction=ex.instruction)


def _finish(ids, flags: np.ndarray, eos_id: int, has_eos: bool):
    ids = np.asarray(ids, dtype=np.int64)
    if not has_eos:
        ids = np.append(ids, eos_id)
        flags = np.append(flags, np.uint8(1))
    return ids, flags


def _span_tokens(enc, i: int, s: int, e: int) -> Tuple[int, int]:
    """Tokens ``[a, z)`` of batch item `i` that hold at least one character of ``text[s:e]`` (a token
    straddling the span's start, e.g. sentencepiece's "▁word" taking the space before it, is in).
    ``char_to_token`` runs in the Rust tokenizer; only characters no token covers (e.g. removed by
    a normalizer) fall back to scanning the offsets."""
    a, z = enc.char_to_token(i, s), enc.char_to_token(i, e - 1)
    if a is not None and z is not None:
        return a, z + 1
    idx = [j for j, (ts, te) in enumerate(enc.encodings[i].offsets)
           if ((ts < e and te > s) if te > ts else (s <= ts < e))]
    return (idx[0], idx[-1] + 1) if idx else (0, 0)


def _tokenize_alpaca(batch: Sequence[Example], tokenizer, loss_on: str, use_offsets: bool):
    eos = tokenizer.eos_token_id
    prompts = [_alpaca_prompt(ex) for ex in batch]
    out = []
    if use_offsets:
        texts = [p + ex.response for p, ex in zip(prompts, batch)]
        enc = tokenizer(texts, add_special_tokens=True)
        for i, (p, t, ids) in enumerate(zip(prompts, texts, enc["input_ids"])):
            b, z = _span_tokens(enc, i, len(p), len(t))  # the response's tokens
            if z <= b:  # the response tokenized to nothing
                out.append(None)
                continue
            flags = np.ones(len(ids), dtype=np.uint8)
            if loss_on != "all":
                flags[:b] = 0  # from the response's first token to the end (incl. a tokenizer-added eos)
            out.append(_finish(ids, flags, eos, ids[-1] == eos))
    else:  # tokenizers without offsets: prompt and response tokenized separately
        penc = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        renc = tokenizer([ex.response for ex in batch], add_special_tokens=False)["input_ids"]
        for p_ids, r_ids in zip(penc, renc):
            if not r_ids:
                out.append(None)
                continue
            ids = list(p_ids) + list(r_ids)
            flags = np.ones(len(ids), dtype=np.uint8)
            if loss_on != "all":
                flags[: len(p_ids)] = 0
            out.append(_finish(ids, flags, eos, ids[-1] == eos))
    return out


def _render(tokenizer, msgs, chat_template, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)


def assistant_char_spans(tokenizer, msgs: List[dict], chat_template=None, location: str = "") -> Tuple[str, list]:
    """Render `msgs` and return ``(text, [(start, end), ...])``: the character span of each assistant
    turn in the rendered text. A turn spans from the end of the conversation-so-far rendered with the
    generation prompt to the end of the conversation rendered through that turn, so it includes the
    template's end-of-turn text. Templates for which these renderings are not prefixes of the full
    text fall back to locating the assistant content verbatim (plus a directly following eos token)."""
    full = _render(tokenizer, msgs, chat_template)
    spans, cursor = [], 0
    eos_text = tokenizer.eos_token or ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        span = None
        if i > 0:
            try:
                pre = _render(tokenizer, msgs[:i], chat_template, add_generation_prompt=True)
                upto = _render(tokenizer, msgs[: i + 1], chat_template)
            except Exception:
                pre = upto = None
            if (pre is not None and upto.startswith(pre) and full.startswith(upto) and len(pre) >= cursor
                    and len(upto) > len(pre)):
                span = (len(pre), len(upto))
        if span is None:
            s = full.find(m["content"], cursor)
            if s < 0:
                raise DataError(location, f"the chat template does not render assistant message {i} verbatim; "
                                          "cannot build an assistant-only loss mask")
            e = s + len(m["content"])
            if eos_text and full.startswith(eos_text, e):
                e += len(eos_text)
            span = (s, e)
        spans.append(span)
        cursor = span[1]
    return full, spans


def _tokenize_chat(batch: Sequence[Example], tokenizer, chat_template, use_offsets: bool):
    eos = tokenizer.eos_token_id
    rendered = [assistant_char_spans(tokenizer, ex.messages, chat_template, ex.location) for ex in batch]
    out = []
    if use_offsets:
        enc = tokenizer([t for t, _ in rendered], add_special_tokens=False)
        for i, ((text, spans), ids) in enumerate(zip(rendered, enc["input_ids"])):
            flags = np.zeros(len(ids), dtype=np.uint8)
            a = z = 0
            for s, e in spans:
                a, z = _span_tokens(enc, i, s, e)
                flags[a:z] = 1
            if not flags.any():
                out.append(None)
                continue
            out.append(_finish(ids, flags, eos, eos in ids[a:z]))
    else:  # no offsets: tokenize the non-assistant / assistant pieces separately
        for text, spans in rendered:
            ids, flags, pos, last_ids = [], [], 0, []
            for s, e in spans:
                for piece, flag in ((text[pos:s], 0), (text[s:e], 1)):
                    if piece:
                        t = tokenizer(piece, add_special_tokens=False)["input_ids"]
                        ids += t
                        flags += [flag] * len(t)
                        if flag:
                            last_ids = t
                pos = e
            if pos < len(text):
                t = tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
                ids += t
                flags += [0] * len(t)
            if not any(flags):
                out.append(None)
                continue
            out.append(_finish(ids, np.asarray(flags, dtype=np.uint8), eos, eos in last_ids))
    return out


def tokenize_examples(examples: Sequence[Example], tokenizer, fmt: str, *, loss_on: str = "all",
                      chat_template: Optional[str] = None, batch_size: int = 512,
                      use_offsets: Optional[bool] = None) -> list:
    """Tokenize `examples`; returns a list aligned with them of ``(ids int64[n], flags uint8[n])``, or
    ``None`` where the response tokenized to nothing. Batches go through the tokenizer at once (fast
    tokenizers tokenize a batch in parallel). `use_offsets`: None = when the tokenizer is fast."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    if use_offsets is None:
        use_offsets = _is_fast(tokenizer)
    chat_template = resolve_chat_template(chat_template)
    if fmt == "chat" and chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("fmt='chat' needs a tokenizer with a chat_template (or pass chat_template=...)")
    out = []
    for k in range(0, len(examples), batch_size):
        batch = examples[k: k + batch_size]
        if fmt == "alpaca":
            out += _tokenize_alpaca(batch, tokenizer, loss_on, use_offsets)
        elif fmt == "chat":
            out += _tokenize_chat(batch, tokenizer, chat_template, use_offsets)
        else:
            raise ValueError(f"unknown format {fmt!r} (alpaca | chat)")
    return out
