#!/usr/bin/env python
"""Regenerate the tiny bundled SFT data and tokenizer (deterministic, no network).

    python examples/data/make_tiny_data.py            # rewrites the files next to this script

Writes
  sft_tiny.jsonl    alpaca-style rows {"instruction", "output"} (a few with "input"): arithmetic and
                    string tasks whose answers are computed, so a tiny model can actually learn them.
  chat_tiny.jsonl   `messages`-style rows (user/assistant, some multi-turn, some with a system turn).
  tokenizer/        a byte-level BPE (vocab 1024) trained with `tokenizers` on both files, saved as a
                    transformers `PreTrainedTokenizerFast` directory with eos/pad tokens and a
                    tulu/OLMo-style chat template.
"""

import argparse
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

WORDS = (
    "apple banana cherry grape lemon mango orange peach pear plum river mountain forest ocean desert "
    "island valley meadow garden bridge castle village market school window pencil rocket planet "
    "silver golden purple yellow green blue red quiet happy simple little bright winter summer "
    "spring autumn morning evening dragon tiger rabbit turtle falcon dolphin kitten puppy coffee "
    "butter bread honey candle ladder mirror pillow basket button"
).split()

# tulu-3 / OLMo chat template (the assistant turn ends with the eos token).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL = [EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"]


def _task(rng):
    """One (instruction, input, output) triple; input is '' for most tasks."""
    kind = rng.randrange(10)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}."
    if kind == 1:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} - {b}?", "", f"{a} - {b} = {a - b}."
    if kind == 2:
        a, b = rng.randrange(13), rng.randrange(13)
        return f"Multiply {a} by {b}.", "", f"{a} * {b} = {a * b}."
    if kind == 3:
        w = rng.choice(WORDS)
        return f'Reverse the word "{w}".', "", w[::-1]
    if kind == 4:
        ws = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
        return "Write the following text in upper case.", ws, ws.upper()
    if kind == 5:
        w = rng.choice(WORDS)
        return f'How many letters are in the word "{w}"?', "", f'The word "{w}" has {len(w)} letters.'
    if kind == 6:
        xs = [rng.randrange(50) for _ in range(rng.randint(3, 6))]
        return (f"Sort these numbers in ascending order: {', '.join(map(str, xs))}.", "",
                ", ".join(map(str, sorted(xs))))
    if kind == 7:
        n = rng.randrange(200)
        return f"Is {n} even or odd?", "", f"{n} is {'even' if n % 2 == 0 else 'odd'}."
    if kind == 8:
        xs = [rng.randrange(100) for _ in range(rng.randint(3, 6))]
        return "Find the largest number in the list.", ", ".join(map(str, xs)), f"The largest number is {max(xs)}."
    ws = rng.sample(WORDS, rng.randint(2, 5))
    return (f"List the first letter of each word: {' '.join(ws)}.", "", " ".join(w[0] for w in ws))


def make_rows(n_alpaca=400, n_chat=120, seed=0):
    rng = random.Random(seed)
    alpaca = []
    for _ in range(n_alpaca):
        instruction, inp, output = _task(rng)
        row = {"instruction": instruction, "output": output}
        if inp:
            row["input"] = inp
        alpaca.append(row)
    chat = []
    for _ in range(n_chat):
        msgs = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": "You are a helpful assistant."})
        for _ in range(1 if rng.random() < 0.7 else 2):
            instruction, inp, output = _task(rng)
            msgs.append({"role": "user", "content": f"{instruction}\n{inp}" if inp else instruction})
            msgs.append({"role": "assistant", "content": output})
        chat.append({"messages": msgs})
    return alpaca, chat


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def train_tokenizer(texts, out_dir, vocab_size=1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                 model_max_length=4096)
    hf.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    # Loadable by transformers 4.x as well: the 4.x class name, and the template inside the config
    # (4.x reads tokenizer_config.json's chat_template; 5.x reads chat_template.jinja).
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("backend", None)
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    with open(cfg_path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return hf


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=HERE)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    alpaca, chat = make_rows(seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    _write_jsonl(os.path.join(args.out, "sft_tiny.jsonl"), alpaca)
    _write_jsonl(os.path.join(args.out, "chat_tiny.jsonl"), chat)
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately "
              "completes the request.\n\n### Instruction:\n")
    texts = [prompt + r["instruction"] + "\n\n### Input:\n" + r.get("input", "") + "\n\n### Response:\n"
             + r["output"] for r in alpaca]
    texts += ["\n".join(m["content"] for m in r["messages"]) for r in chat]
    hf = train_tokenizer(texts, os.path.join(args.out, "tokenizer"))
    print(f"wrote {len(alpaca)} alpaca rows, {len(chat)} chat rows, tokenizer vocab {len(hf)} to {args.out}")


if __name__ == "__main__":
    main()
