"""The paper's evaluation suites as lm-eval (lm-evaluation-harness 0.4.13) task presets.

arXiv 2503.00634 (Compressed Experts), experiments section: each SFT domain is scored on its own
benchmarks — math (MathInstruct SFT) on GSM8K with zero-shot chain of thought, coding
(Magicoder-Evol-Instruct SFT) on HumanEval pass@1, general (tulu-3 SFT) on IFEval, BIG-Bench Hard
and TruthfulQA. docs/RESULTS.md records what we measured with these presets.

Each row names the lm-eval task (verified in lm_eval/tasks/ of lm-eval 0.4.13), the shot count, the
metric (and lm-eval filter) the table reports, and the generation settings; the shot count and
generation settings are the task YAML's own defaults, written out here so that a change of those
defaults in another lm-eval version is caught (`runner.check_preset_shots`) instead of silently
changing the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class PresetTask:
    task: str  # lm-eval task or group name
    num_fewshot: int
    metric: str  # metric key in lm-eval's results ("exact_match", "pass@1", "acc", ...)
    filters: Tuple[str, ...] = ("none",)  # lm-eval filter names whose scores the table reports
    gen_kwargs: Dict[str, object] = field(default_factory=dict)  # informational: the YAML's settings
    unsafe_code: bool = False  # executes model-written code: needs --confirm-run-unsafe-code
    note: str = ""


PRESETS: Dict[str, List[PresetTask]] = {
    # math: GSM8K test set, 0-shot CoT prompt "Q: ...\nA: Let's think step by step.", greedy; exact match
    # of the final number, both lm-eval extractions ("The answer is N." strict, last number flexible).
    "paper-math": [
        PresetTask("gsm8k_cot_zeroshot", 0, "exact_match", ("strict-match", "flexible-extract"),
                   {"until": ["Q:", "</s>", "<|im_end|>"], "do_sample": False}),
    ],
    # coding: HumanEval pass@1, greedy, 0-shot completion of the function stub (up to 1024 tokens).
    "paper-coding": [
        PresetTask("humaneval", 0, "pass@1", ("create_test",),
                   {"max_gen_toks": 1024, "do_sample": False}, unsafe_code=True),
    ],
    # general: IFEval (prompt/instruction-level strict and loose accuracy), BBH with the 3-shot CoT
    # exemplars (exact match of "the answer is X"), TruthfulQA MC2 (0-shot, normalised probability of
    # the true answers).
    "paper-general": [
        PresetTask("ifeval", 0, "prompt_level_strict_acc", ("none",),
                   {"max_gen_toks": 1280, "do_sample": False}),
        PresetTask("bbh_cot_fewshot", 3, "exact_match", ("get-answer",),
                   {"max_gen_toks": 1024, "do_sample": False}),
        PresetTask("truthfulqa_mc2", 0, "acc", ("none",)),
    ],
}

# Not part of the paper's tables but close at hand: MBPP (3-shot, pass@1) for coding, BBH without CoT.
OPTIONAL_TASKS: Dict[str, PresetTask] = {
    "mbpp": PresetTask("mbpp", 3, "pass_at_1", ("none",), {"do_sample": False}, unsafe_code=True),
    "bbh_zeroshot": PresetTask("bbh_zeroshot", 0, "exact_match", ("strict-match", "flexible-extract"),
                               {"do_sample": False}),
}


def preset_names() -> List[str]:
    return sorted(PRESETS)


def preset_tasks(name: str) -> List[PresetTask]:
    """The rows of preset `name`; KeyError with the known names otherwise."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r} (choose from {', '.join(preset_names())})")
    return list(PRESETS[name])


def known_row(task: str) -> Optional[PresetTask]:
    """The preset (or optional) row of a task name, if we describe it."""
    for rows in PRESETS.values():
        for row in rows:
            if row.task == task:
                return row
    return OPTIONAL_TASKS.get(task)


def needs_unsafe_code(tasks: List[str]) -> List[str]:
    """The names among `tasks` that execute model-generated code."""
    return [t for t in tasks if (row := known_row(t)) is not None and row.unsafe_code]
