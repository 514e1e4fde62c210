#!/usr/bin/env python
"""Regenerate the JSONL rows of the bundled tiny tasks (deterministic; the output is committed).

    python megatron_ce/eval/tasks/make_tiny_tasks.py

`ce_tiny_addition` (generate_until, exact_match) and `ce_tiny_choice` (multiple_choice, acc) exist so
that `tools/evaluate.py` runs end to end offline in CI on a tiny random model: their scores mean
nothing, the run is what is tested. Both are small (ROWS rows) to keep that run fast.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = 32


def addition_rows(rng):
    rows = []
    for i in range(ROWS):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"id": i, "question": f"What is {a} + {b}?", "answer": str(a + b)})
    return rows


def choice_rows(rng):
    rows = []
    for i in range(ROWS):
        a, b = rng.sample(range(100), 2)
        # the larger number sits at a random position so that always picking one slot scores ~50%
        choices = [str(a), str(b)] if rng.random() < 0.5 else [str(b), str(a)]
        rows.append({"id": i, "question": f"Which number is larger, {choices[0]} or {choices[1]}?",
                     "choices": choices, "label": choices.index(str(max(a, b)))})
    return rows


def write_jsonl(name, rows):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def main():
    write_jsonl("ce_tiny_addition.jsonl", addition_rows(random.Random(0)))
    write_jsonl("ce_tiny_choice.jsonl", choice_rows(random.Random(1)))


if __name__ == "__main__":
    main()
