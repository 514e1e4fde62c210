"""The tokenizer recorded with a checkpoint, and carried into its HF export with a generation config.

An HF export must load on its own (`AutoTokenizer.from_pretrained(export)`; lm-eval's `hf` model
does exactly that unless given `tokenizer=`), so the tokenizer travels with the weights:

    trainer checkpoint    SAVE/iter_NNNNNNN/tokenizer/   the tokenizer the run trained with
                          (`save_tokenizer(args.tokenizer_model, iter_N.tmp, args.chat_template)`, rank 0,
                          inside the folder that is then renamed to iter_N: it appears with it, atomically)
    converter checkpoint  SAVE/hf_files/                 the HF model's tokenizer + generation_config
                          files, when its folder has them (convert_hf_to_megatron; checkpoint_format.HF_FILES_DIR)

`find_tokenizer(checkpoint)` returns the first of these that holds tokenizer files (the iteration's
own first: a run saving into a converter's folder trained with its own tokenizer). The exporter
(`make_self_contained`, called by convert_megatron_to_hf after the weights and config.json)
copies it into the export, or the tokenizer given with `--tokenizer` instead, and writes
generation_config.json with the tokenizer's bos/eos/pad ids (the eos the SFT data ended every
response with), falling back to config.json's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Any, Dict, Optional, Union

from megatron_ce.checkpoint_format import HF_FILES_DIR, TOKENIZER_DIR, one_line, resolve_checkpoint_dir

GENERATION_CONFIG = "generation_config.json"

# What a tokenizer is saved as (transformers save_pretrained, sentencepiece, BPE vocab + merges).
# generation_config.json is not among them: it belongs to the model and is handled on its own.
TOKENIZER_FILE_PATTERNS = (
    r"tokenizer.*",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"vocab\..*",
    r"merges\.txt",
    r".*\.model",
    r"chat_template\..*",
)
# Of which at least one makes a folder loadable by AutoTokenizer (tokenizer_config.json alone is not).
_LOADABLE = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
             "sentencepiece.bpe.model")


def _is_tokenizer_file(name: str) -> bool:
    return any(re.fullmatch(p, name) for p in TOKENIZER_FILE_PATTERNS)


def copy_hf_files(src: str, dst: str) -> None:
    """Copy the tokenizer and generation-config files (not weights, not config.json) of folder src into
    dst (created when there is something to copy): an HF model's into a converted checkpoint's hf_files/,
    and from there into its export."""
    if not os.path.isdir(src):
        return
    names = [n for n in os.listdir(src) if _is_tokenizer_file(n) or n == GENERATION_CONFIG]
    if names:
        os.makedirs(dst, exist_ok=True)
        for n in names:
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))


def has_tokenizer_files(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in _LOADABLE)


# ------------------------------------------------------------------------------------------
# Recording (trainer)
# ------------------------------------------------------------------------------------------


def save_tokenizer(source: Union[str, os.PathLike, Any], dest_dir: str, chat_template: Optional[str] = None) -> str:
    """Write the tokenizer as trained with into `dest_dir/tokenizer/`; returns that folder.

    source: a tokenizer object, or what --tokenizer-model accepts (a folder or hub name), loaded by the
    trainer's own `load_tokenizer` so that its pad token (eos when the tokenizer has none) and the
    --chat-template override are recorded as used. Written to `tokenizer.part` and renamed: a crash
    leaves no half-written `tokenizer/` (the trainer's save also renames the whole folder after)."""
    from megatron_ce.data import load_tokenizer

    tok = load_tokenizer(source, chat_template=chat_template) if isinstance(source, (str, os.PathLike)) else source
    out = os.path.join(os.fspath(dest_dir), TOKENIZER_DIR)
    part = out + ".part"
    shutil.rmtree(part, ignore_errors=True)
    tok.save_pretrained(part)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(part, out)
    return out


# ------------------------------------------------------------------------------------------
# Finding (exporter)
# ------------------------------------------------------------------------------------------


def find_tokenizer(checkpoint: str) -> Optional[str]:
    """The tokenizer folder recorded with a checkpoint (a save dir with a tracker file, or an iteration /
    release folder itself), or None. Layout: see the module docstring."""
    ckpt_dir = os.path.abspath(resolve_checkpoint_dir(os.fspath(checkpoint)))
    for d in (os.path.join(ckpt_dir, TOKENIZER_DIR), os.path.join(os.path.dirname(ckpt_dir), HF_FILES_DIR)):
        if has_tokenizer_files(d):
            return d
    return None


def tokenizer_source(checkpoint: str, tokenizer: Optional[str] = None) -> Optional[str]:
    """What an export of `checkpoint` takes its tokenizer from: `tokenizer` (--tokenizer) when given,
    else the one recorded with the checkpoint; None when there is neither."""
    return tokenizer if tokenizer is not None else find_tokenizer(checkpoint)


# ------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------


def _conversion_error(msg: str) -> Exception:
    from megatron_ce.convert.mapping import ConversionError

    return ConversionError(msg)


def load_override(tokenizer: str):
    """The --tokenizer tokenizer, loaded (before any weights are converted: a wrong path fails fast)."""
    from megatron_ce.data import load_tokenizer

    if os.path.isdir(tokenizer) and not has_tokenizer_files(tokenizer):
        raise _conversion_error(f"--tokenizer {tokenizer}: no tokenizer files ({', '.join(_LOADABLE[:3])}, ...)")
    try:
        return load_tokenizer(tokenizer)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a non-tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _conversion_error(f"--tokenizer {tokenizer}: cannot load a tokenizer ({first})") from None


def _replace_tokenizer_files(save_dir: str, write) -> None:
    """Drop the tokenizer files already in save_dir (e.g. the converter's copy that another tokenizer
    overrides: files of two tokenizers mixed load as neither), then `write()` the new ones."""
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if _is_tokenizer_file(name) and os.path.isfile(path):
            os.remove(path)
    write()


def _copy_tokenizer_files(src: str, save_dir: str) -> None:
    for name in os.listdir(src):
        if _is_tokenizer_file(name) and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(save_dir, name))


def _token_ids(tok, config: Dict[str, Any]) -> Dict[str, Any]:
    """bos/eos/pad for generation: the tokenizer's (what the model was fine-tuned to end with), else
    config.json's; pad falls back to eos (generate() pads finished rows with it)."""
    ids = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tok, name, None) if tok is not None else None
        ids[name] = value if value is not None else config.get(name)
    eos = ids["eos_token_id"]
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) and eos else eos
    return ids


def write_generation_config(save_dir: str, tok=None) -> str:
    """generation_config.json: the one already there (the HF model's, copied by the converter) or a new
    one, with bos/eos/pad from `_token_ids`. An eos list that already holds the tokenizer's eos (models
    with several stop tokens) is kept."""
    from transformers import GenerationConfig

    with open(os.path.join(save_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    path = os.path.join(save_dir, GENERATION_CONFIG)
    gen = GenerationConfig.from_pretrained(save_dir) if os.path.isfile(path) else GenerationConfig()
    ids = _token_ids(tok, config)
    if isinstance(gen.eos_token_id, list) and ids["eos_token_id"] in gen.eos_token_id:
        ids["eos_token_id"] = gen.eos_token_id
    for name, value in ids.items():
        if value is not None:
            setattr(gen, name, value)
    gen.save_pretrained(save_dir)
    return path


def make_self_contained(save_dir: str, load_dir: str, tokenizer: Optional[str] = None, override=None) -> Optional[str]:
    """After an export wrote its weights and config.json: put the tokenizer (`tokenizer`, a folder or hub
    name, else the one recorded with the checkpoint in load_dir) and generation_config.json into
    save_dir. Returns where the tokenizer came from, or None when there is none (the export then has
    only a generation config from config.json; the caller says so). `override`: `tokenizer` already
    loaded by `load_override`. Idempotent."""
    from transformers import AutoTokenizer

    save_dir = os.fspath(save_dir)
    source = tokenizer_source(load_dir, tokenizer)
    tok = None
    if source is not None:
        if tokenizer is not None:
            obj = override if override is not None else load_override(tokenizer)
            _replace_tokenizer_files(save_dir, lambda: obj.save_pretrained(save_dir))
        else:
            _replace_tokenizer_files(save_dir, lambda: _copy_tokenizer_files(source, save_dir))
        try:  # what lm-eval / users will do with the export
            # trust_remote_code: the export's auto_map names the CE modeling code we just wrote there;
            # without it transformers asks on the terminal whether to run it (and waits).
            tok = AutoTokenizer.from_pretrained(save_dir, trust_remote_code=True)
        except Exception as e:
            raise _conversion_error(f"the tokenizer from {source} does not load from {save_dir} ({one_line(e)})") from None
        _check_vocab(tok, save_dir, source)
    write_generation_config(save_dir, tok)
    return source


def _check_vocab(tok, save_dir: str, source: str) -> None:
    with open(os.path.join(save_dir, "config.json"), encoding="utf-8") as f:
        vocab = json.load(f).get("vocab_size")
    if isinstance(vocab, int) and len(tok) > vocab:
        warnings.warn(f"the tokenizer from {source} has {len(tok)} tokens but the model's vocab_size is {vocab}: "
                      "the tokenizer of another model?")


def missing_tokenizer_note(save_dir: str) -> str:
    return (f"warning: the export {save_dir} has no tokenizer (none recorded with the checkpoint): pass "
            "--tokenizer DIR (the tokenizer the model was trained with), or lm-eval needs tokenizer=DIR")
