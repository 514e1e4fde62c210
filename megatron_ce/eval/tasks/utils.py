"""Dataset loader for the local-JSONL task YAMLs in this folder (lm-eval `custom_dataset`).

lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset("json", ...)`, which resolves a
relative path against the current directory; this loader resolves it against this folder instead, so
the tasks run from any working directory and need no network or dataset cache. Copy it next to your
own YAMLs to define local tasks the same way.
"""

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_local_json(data_files=None, **_metadata):
    """`{split: file}` (relative to this folder, or absolute) -> DatasetDict. lm-eval also passes the
    task metadata (model_args, version) as keyword arguments; they do not affect the data."""
    import datasets

    if not isinstance(data_files, dict) or not data_files:
        raise ValueError("dataset_kwargs.data_files must map split names to JSONL files")
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(_read_jsonl(os.path.join(HERE, name)))
        for split, name in data_files.items()
    })
