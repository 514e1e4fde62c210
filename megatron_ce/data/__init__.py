"""SFT data pipeline (no megatron-core dependency): sources, prompt formats, packing, datasets.

    from megatron_ce.data import build_sft_dataset, load_tokenizer, packed_attention_mask
    tok = load_tokenizer("examples/data/tokenizer")
    train_ds, eval_ds, stats = build_sft_dataset("examples/data/sft_tiny.jsonl", tok, seq_length=256,
                                                 fmt="alpaca", packing="reference", split_eval=0.05)
"""

from .dataset import FORMATS, PACKING_MODES, SFTDataset, SFTDataStats, build_sft_dataset, load_tokenizer
from .formatting import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
from .packing import best_fit_decreasing, cu_seqlens_from_document_ids, packed_attention_mask, unpad_cu_seqlens
from .sources import TASK_PRESETS, DataError, TaskPreset, iter_rows, read_rows
from .args import add_sft_data_args, build_sft_dataset_from_args

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_WITH_INPUT",
    "DataError",
    "FORMATS",
    "PACKING_MODES",
    "SFTDataStats",
    "SFTDataset",
    "TASK_PRESETS",
    "TaskPreset",
    "add_sft_data_args",
    "best_fit_decreasing",
    "build_sft_dataset",
    "build_sft_dataset_from_args",
    "cu_seqlens_from_document_ids",
    "iter_rows",
    "load_tokenizer",
    "packed_attention_mask",
    "read_rows",
    "unpad_cu_seqlens",
]
