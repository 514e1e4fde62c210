"""HF <-> megatron-core conversion driven by a family's declarative table.

Each direction reads as plan -> validate -> stream -> write:

HF -> Megatron (`convert_hf_to_megatron`, convert/hf_to_megatron.py):
  1. plan: read config.json, pick the family (model_type, or the override), decide CE (flag / config:
     convert/settings.py) and where its tables come from (`ce_import_mappings`); build the family's
     mcore model at TP=PP=EP=1 on the meta device and read its dist-checkpoint layout (keys, global
     shapes, chunks) from megatron-core itself (convert/layout.py);
  2. validate: expand the table and check the HF checkpoint against it before writing anything:
     missing, unexpected and mis-shaped tensors -> one ConversionError listing them all;
  3. stream + write: a torch_dist checkpoint one layer at a time (tqdm bar per layer): each parameter
     is produced from its HF tensors (read lazily from safetensors) when written.
  Output (megatron_ce/checkpoint_format.py): SAVE_DIR/release/ (the dist checkpoint, loadable with
  `dist_checkpointing.load(model.sharded_state_dict(), dir)` at any TP/EP/PP and under
  --transformer-impl local or transformer_engine: its keys are the TE spec's,
  megatron_ce.ce.spec.with_te_checkpoint_keys), megatron_ce.json (family, HF config, CE settings) in
  both directories, SAVE_DIR/hf_files/ (tokenizer, generation config), and last the tracker
  latest_checkpointed_iteration.txt ("release").

Megatron -> HF (`convert_megatron_to_hf`, convert/megatron_to_hf.py): the reverse, one layer at a time:
read each layer's parameters as regions of the global tensors (works for a checkpoint saved at any
layout, by either --transformer-impl, or converted before the TE-layout keys: convert/keys.py), convert,
and append to safetensors shards; then config.json (+ CE fields when CE is on, `ce_export_mappings`),
the tokenizer recorded with the checkpoint and generation_config.json.

This module keeps the names other code imports from it.
"""

from megatron_ce.checkpoint_format import META_NAME  # noqa: F401
from megatron_ce.checkpoint_format import resolve_checkpoint_dir as _resolve
from megatron_ce.convert.hf_to_megatron import ce_import_mappings, convert_hf_to_megatron  # noqa: F401
from megatron_ce.convert.layout import build_layout_model, world1_parallel_state  # noqa: F401
from megatron_ce.convert.megatron_to_hf import ce_export_mappings, convert_megatron_to_hf  # noqa: F401
from megatron_ce.convert.settings import DTYPES, conversion_errors  # noqa: F401


def resolve_checkpoint_dir(load_dir: str) -> str:
    """The dist checkpoint folder of a save folder (through its tracker) or the folder itself;
    a ConversionError otherwise (checkpoint_format.resolve_checkpoint_dir's FormatError)."""
    with conversion_errors():
        return _resolve(load_dir)
