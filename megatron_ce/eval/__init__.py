"""Evaluation of exported HF models with lm-eval (`tools/evaluate.py`): the paper's task presets and
a runner that writes the result table beside the model. lm-eval is the optional `[eval]` extra and is
imported only when a run starts."""

from megatron_ce.eval.presets import PRESETS, PresetTask, preset_names, preset_tasks
from megatron_ce.eval.runner import BUNDLED_TASKS_DIR, EvalError, EvalOptions, run_evaluation

__all__ = ["BUNDLED_TASKS_DIR", "EvalError", "EvalOptions", "PRESETS", "PresetTask", "preset_names",
           "preset_tasks", "run_evaluation"]
