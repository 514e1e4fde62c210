"""Synthetic character-level tasks of the scaled-down reproduction (docs/RESULTS.md).

Pretraining: a mixture of addition (operand widths other than the SFT width), subtraction, reversal and
copy. SFT: addition of `digits`-digit operands, answer written least-significant digit first. The test
and validation problems are fixed operand pairs drawn once (not per seed), disjoint from each other, and
never drawn for SFT or calibration, so every variant and seed is scored on the same items (paired).
"""

from __future__ import annotations

import random
from typing import Callable, List, Tuple

import torch

CHARS = "0123456789+-=rc:;"  # ';' ends an answer
PAD = 0
STOI = {c: i + 1 for i, c in enumerate(CHARS)}
ITOS = {i: c for c, i in STOI.items()}
EOS = STOI[";"]
VOCAB = 32  # padded

Problem = Tuple[str, str]  # (prompt, answer)


def encode(s: str) -> List[int]:
    return [STOI[c] for c in s]


def decode(ids) -> str:
    return "".join(ITOS.get(int(i), "?") for i in ids)


def add_problem(a: int, b: int, digits: int) -> Problem:
    return f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"[::-1] + ";"


def add_example(rng: random.Random, digits: int) -> Problem:
    return add_problem(rng.randrange(10 ** digits), rng.randrange(10 ** digits), digits)


def pretrain_line(rng: random.Random, sft_digits: int) -> str:
    """One line of the pretraining mixture. Additions never use the SFT operand width, so neither a
    held-out SFT problem nor the SFT format itself is seen in pretraining: SFT is a transfer task."""
    t = rng.random()
    d = rng.randint(1, 3)
    if t < 0.4:
        p, a = add_example(rng, rng.choice([w for w in (1, 2, 3, 4) if w != sft_digits]))
        return p + a
    if t < 0.6:
        a, b = sorted((rng.randrange(10 ** d), rng.randrange(10 ** d)), reverse=True)
        return f"{a:0{d}d}-{b:0{d}d}=" + f"{a - b:0{d}d}"[::-1] + ";"
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 7)))
    if t < 0.8:
        return f"r:{s}=" + s[::-1] + ";"
    return f"c:{s}=" + s + ";"


def pretrain_batch(rng: random.Random, batch: int, seq: int, sft_digits: int) -> torch.Tensor:
    """[batch, seq+1] packed blocks of pretraining lines (attention crosses lines, like packing)."""
    rows = []
    for _ in range(batch):
        ids: List[int] = []
        while len(ids) < seq + 1:
            ids += encode(pretrain_line(rng, sft_digits))
        rows.append(ids[: seq + 1])
    return torch.tensor(rows)


def sft_batch(problems: List[Problem]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens [b, L], loss mask on the targets [b, L-1]: answer tokens only). Fixed-width problems."""
    toks = torch.tensor([encode(p + a) for p, a in problems])
    plen = len(problems[0][0])
    mask = torch.zeros(toks.shape[0], toks.shape[1] - 1)
    mask[:, plen - 1:] = 1.0
    return toks, mask


def make_splits(n_test: int, n_val: int, digits: int, split_seed: int = 0):
    """(test, validation, sampler): disjoint operand-pair sets drawn once, and a sampler of SFT /
    calibration problems that never returns a test or validation pair."""
    if n_test + n_val > (10 ** digits) ** 2 // 2:
        raise ValueError(f"--n-test + --n-val ({n_test + n_val}) leave too few {digits}-digit pairs for SFT")
    rng = random.Random(10_000 + split_seed)
    pairs: List[Tuple[int, int]] = []
    seen = set()
    while len(pairs) < n_test + n_val:
        p = (rng.randrange(10 ** digits), rng.randrange(10 ** digits))
        if p not in seen:
            seen.add(p)
            pairs.append(p)
    test = [add_problem(a, b, digits) for a, b in sorted(pairs[:n_test])]
    val = [add_problem(a, b, digits) for a, b in sorted(pairs[n_test:])]

    def sample(r: random.Random) -> Problem:
        while True:
            a, b = r.randrange(10 ** digits), r.randrange(10 ** digits)
            if (a, b) not in seen:
                return add_problem(a, b, digits)

    return test, val, sample


Sampler = Callable[[random.Random], Problem]
