"""The SFT dataset: rows → examples → tokens → fixed-length (packed) samples.

Entry point :func:`build_sft_dataset`. Each item of the returned datasets is a dict of tensors of
fixed length ``s = seq_length`` (default collate stacks them into a batch):

==================  ===========  ===============================================================
key                 dtype/shape  meaning
==================  ===========  ===============================================================
tokens              int64 [s]    input ids (pad id after the last sample)
labels              int64 [s]    next-token targets: ``labels[i] = tokens[i+1]`` within a document;
                                 the pad id where there is no target (loss_mask 0 there)
loss_mask           float32 [s]  1 where ``labels[i]`` is trained on
position_ids        int64 [s]    0.. per sample (boundary / none), 0..s-1 per chunk (reference)
document_ids        int64 [s]    document of each token inside the row (0, 1, ...); -1 = padding
cu_seqlens          int32 [s+1]  segment boundaries ``[0, l0, l0+l1, ..., s]`` (padding is the last
                                 segment), filled with -1 (see ``unpad_cu_seqlens``)
attention_mask      bool [1,s,s] only with ``return_attention_mask=True``: block-diagonal causal
                                 mask, True = masked (``packed_attention_mask(document_ids)``)
==================  ===========  ===============================================================
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .formatting import EMPTY, resolve_chat_template, resolve_layout, row_to_example, tokenize_examples
from .packing import best_fit_decreasing, packed_attention_mask
from .sources import TASK_PRESETS, DataError, iter_rows

__all__ = ["SFTDataset", "SFTDataStats", "build_sft_dataset", "load_tokenizer", "FORMATS", "PACKING_MODES"]

log = logging.getLogger("megatron_ce.data")

FORMATS = ("alpaca", "chat")
PACKING_MODES = ("reference", "boundary", "none")
_MAX_LOCATIONS = 5  # dropped-row locations kept per reason in the stats


def load_tokenizer(path_or_name: Union[str, os.PathLike], chat_template: Optional[str] = None, **kwargs):
    """A transformers tokenizer (``AutoTokenizer.from_pretrained``: BPE ``tokenizer.json`` or
    sentencepiece ``tokenizer.model``) from a local folder or a hub name. Requires an eos token; a
    missing pad token is set to the eos token (pad positions are never trained on). `chat_template`:
    a Jinja string or a path to a ``.jinja`` file, replacing the tokenizer's own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.fspath(path_or_name), **kwargs)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path_or_name} has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log.info("tokenizer %s has no pad token; using the eos token %r", path_or_name, tok.eos_token)
    if chat_template is not None:
        tok.chat_template = resolve_chat_template(chat_template)
    return tok


@dataclasses.dataclass
class SFTDataStats:
    """What the pipeline read, dropped and produced. Every dropped row is counted here and logged."""

    rows_read: int = 0
    dropped_empty_response: int = 0  # empty/whitespace response, or one that tokenizes to nothing
    dropped_overlength: int = 0  # sample (incl. EOS) longer than seq_length (boundary / none)
    overlength_split: int = 0  # reference packing: longer than seq_length, kept and split over chunks
    max_sample_tokens: int = 0
    seq_length: int = 0
    train_samples: int = 0
    train_sequences: int = 0
    train_tokens: int = 0  # sample tokens (no padding)
    train_loss_tokens: int = 0
    eval_samples: int = 0
    eval_sequences: int = 0
    eval_tokens: int = 0
    eval_loss_tokens: int = 0
    dropped_locations: Dict[str, List[str]] = dataclasses.field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return self.dropped_empty_response + self.dropped_overlength

    @property
    def train_fill(self) -> float:
        """Share of the train sequences' token slots that hold sample tokens (not padding)."""
        return self.train_tokens / max(1, self.train_sequences * self.seq_length)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dropped"] = self.dropped
        d["train_fill"] = self.train_fill
        return d

    def summary(self) -> str:
        return (f"SFT data: {self.rows_read} rows read, {self.dropped} dropped "
                f"({self.dropped_empty_response} empty response, {self.dropped_overlength} over "
                f"{self.seq_length} tokens), {self.overlength_split} over-length kept and split; "
                f"train {self.train_samples} samples -> {self.train_sequences} sequences of {self.seq_length} "
                f"({self.train_tokens} tokens, {self.train_loss_tokens} in the loss, fill {self.train_fill:.1%}); "
                f"eval {self.eval_samples} samples -> {self.eval_sequences} sequences")

    def _drop(self, reason: str, location: str):
        setattr(self, f"dropped_{reason}", getattr(self, f"dropped_{reason}") + 1)
        locs = self.dropped_locations.setdefault(reason, [])
        if len(locs) < _MAX_LOCATIONS:
            locs.append(location)


class SFTDataset(torch.utils.data.Dataset):
    """Fixed-length SFT samples over tokenized examples (see the module docstring for the keys).

    Tokens live in one flat array (uint16 when ids fit); sequences are assembled in ``__getitem__``.
    """

    def __init__(self, samples: Sequence[Tuple[np.ndarray, np.ndarray]], seq_length: int, packing: str,
                 pad_id: int, *, locations: Optional[Sequence[str]] = None, seed: int = 1234, shuffle: bool = True,
                 return_attention_mask: bool = False):
        if packing not in PACKING_MODES:
            raise ValueError(f"unknown packing {packing!r} ({' | '.join(PACKING_MODES)})")
        if seq_length < 2:
            raise ValueError("seq_length must be at least 2")
        self.seq_length = int(seq_length)
        self.packing = packing
        self.pad_id = int(pad_id)
        self.return_attention_mask = return_attention_mask
        self.locations = list(locations) if locations is not None else None
        lengths = np.asarray([len(ids) for ids, _ in samples], dtype=np.int64)
        self.offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        max_id = max((int(ids.max()) for ids, _ in samples if len(ids)), default=0)
        dtype = np.uint16 if max(max_id, self.pad_id) < 2 ** 16 else np.int32
        self.tokens = (np.concatenate([ids for ids, _ in samples]).astype(dtype) if len(samples)
                       else np.zeros(0, dtype))
        self.flags = (np.concatenate([f for _, f in samples]).astype(np.uint8) if len(samples)
                      else np.zeros(0, np.uint8))
        S = self.seq_length
        if packing == "reference":
            self.row_ptr = self.row_items = None
            self._len = math.ceil(len(self.tokens) / S)
        else:
            if len(lengths) and lengths.max() > S:
                raise ValueError(f"a sample of {lengths.max()} tokens does not fit seq_length {S}")
            if packing == "boundary":
                bins = best_fit_decreasing(lengths, S)
                if shuffle and bins:
                    perm = np.random.default_rng([seed, 1]).permutation(len(bins))
                    bins = [bins[k] for k in perm]
            else:
                bins = [[k] for k in range(len(samples))]
            self.row_ptr = np.zeros(len(bins) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in bins], out=self.row_ptr[1:])
            self.row_items = np.asarray([k for b in bins for k in b], dtype=np.int64)
            self._len = len(bins)

    # -- introspection -------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def sample(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """Tokenized sample `k`: ``(ids int64[n], flags uint8[n])`` (flags: token is a loss target)."""
        a, b = self.offsets[k], self.offsets[k + 1]
        return self.tokens[a:b].astype(np.int64), self.flags[a:b].copy()

    def row_samples(self, i: int) -> List[int]:
        """Sample indices packed in row `i`, in order (boundary / none packing)."""
        if self.row_ptr is None:
            raise ValueError("reference packing cuts a token stream; rows do not hold whole samples")
        return self.row_items[self.row_ptr[i]:self.row_ptr[i + 1]].tolist()

    def loss_tokens(self) -> int:
        """Number of loss targets over the whole dataset (sum of loss_mask)."""
        if self.packing == "reference":
            total, S = len(self.tokens), self.seq_length
            n = int(self.flags.sum())
            # targets that are the first token of a chunk are lost (no label at a chunk's last position)
            return n - int(self.flags[S:total:S].sum()) - int(self.flags[0]) if total else 0
        first = self.offsets[:-1]
        return int(self.flags.sum()) - int(self.flags[first].sum()) if len(first) else 0

    def __len__(self) -> int:
        return self._len

    # -- items -----------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        S = self.seq_length
        tokens = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, self.pad_id, dtype=np.int64)
        loss = np.zeros(S, dtype=np.float32)
        pos = np.zeros(S, dtype=np.int64)
        doc = np.full(S, -1, dtype=np.int64)
        bounds = [0]
        if self.packing == "reference":
            a = i * S
            b = min(a + S, len(self.tokens))
            L = b - a
            tokens[:L] = self.tokens[a:b]
            labels[: L - 1] = self.tokens[a + 1:b]
            loss[: L - 1] = self.flags[a + 1:b]
            pos[:L] = np.arange(L)
            doc[:L] = 0
            bounds.append(L)
            fill = L
        else:
            fill = 0
            for d, k in enumerate(self.row_samples(i)):
                a, b = self.offsets[k], self.offsets[k + 1]
                n = b - a
                sl = slice(fill, fill + n)
                tokens[sl] = self.tokens[a:b]
                labels[fill: fill + n - 1] = self.tokens[a + 1:b]
                loss[fill: fill + n - 1] = self.flags[a + 1:b]
                pos[sl] = np.arange(n)
                doc[sl] = d
                fill += n
                bounds.append(fill)
        if fill < S:
            pos[fill:] = np.arange(S - fill)
            bounds.append(S)
        cu = np.full(S + 1, -1, dtype=np.int32)
        cu[: len(bounds)] = bounds
        out = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss),
            "position_ids": torch.from_numpy(pos),
            "document_ids": torch.from_numpy(doc),
            "cu_seqlens": torch.from_numpy(cu),
        }
        if self.return_attention_mask:
            out["attention_mask"] = packed_attention_mask(out["document_ids"])[0]
        return out


def _split_indices(n: int, split_eval: float, seed: int, shuffle: bool):
    if not 0.0 <= split_eval < 1.0:
        raise ValueError("split_eval must be in [0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = 0
    if split_eval > 0 and n > 1:
        n_eval = min(n - 1, max(1, int(round(split_eval * n))))
    ev, tr = perm[:n_eval], perm[n_eval:]
    if not shuffle:
        ev, tr = np.sort(ev), np.sort(tr)
    return tr.tolist(), ev.tolist()


def build_sft_dataset(
    path_or_name=None, tokenizer=None, seq_length: int = 1024, *, fmt: str = "alpaca",
    packing: Optional[str] = None, task: Optional[str] = None, split_eval: float = 0.0, seed: int = 1234,
    shuffle: bool = True, loss_on: Optional[str] = None, chat_template: Optional[str] = None,
    prompt_field: Optional[str] = None, response_field: Optional[str] = None, input_field: Optional[str] = "input",
    messages_field: Optional[str] = None, first_turn_only: Optional[bool] = None, max_rows: Optional[int] = None,
    return_attention_mask: bool = False, split: str = "train", hub_config: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> Tuple[SFTDataset, Optional[SFTDataset], SFTDataStats]:
    """Build train (and held-out eval) SFT datasets. Returns ``(train_ds, eval_ds or None, stats)``.

    path_or_name: local .jsonl/.json/.parquet file, folder or list of them, a hub name, or a
        ``datasets.Dataset``; None with `task` = the task's hub dataset.
    tokenizer: a transformers tokenizer or a path/name for :func:`load_tokenizer`.
    fmt: "alpaca" (the reference prompt) or "chat" (tokenizer chat template, assistant-only loss).
    packing: "reference" | "boundary" | "none"; default "reference" for alpaca (the paper's recipe),
        "boundary" for chat.
    task: "math" | "coding" | "general" – the paper's datasets and their field layouts.
    split_eval: fraction of (non-empty) rows held out for eval, chosen by `seed`.
    seed / shuffle: sample order (and packed row order) is a deterministic shuffle by `seed`;
        shuffle=False keeps file order.
    loss_on: "all" (default for alpaca: every token, as the reference) | "response" (alpaca only:
        response + EOS). chat always trains on assistant turns only.
    first_turn_only: messages data: use only the first user/assistant pair (default: on for
        task="general", as the reference; alpaca always uses the first pair).
    Explicit field names (prompt_field+response_field, or messages_field) override detection, which
        otherwise looks at the first row of each file ('messages', or 'instruction' + 'output' /
        'response'; an optional 'input' column adds the Alpaca "### Input:" section).
    max_rows: read at most this many rows. return_attention_mask: add [1,s,s] masks to items.

    Bad data (malformed JSON, invalid UTF-8, a missing or mistyped field) raises
    :class:`~megatron_ce.data.sources.DataError` ``"file:line: reason"``. Rows with an empty response,
    and samples longer than `seq_length` (boundary/none packing), are dropped; both are counted in
    the returned stats and logged.
    """
    packing, loss_on, preset = _resolve_recipe(fmt, packing, loss_on, task)
    path_or_name, tokenizer, seq_length = _resolve_inputs(path_or_name, tokenizer, seq_length, preset)
    stats = SFTDataStats(seq_length=seq_length)
    layout_kw = dict(preset=preset, prompt_field=prompt_field, response_field=response_field, input_field=input_field,
                     messages_field=messages_field, first_turn_only=first_turn_only)
    examples = _read_examples(path_or_name, fmt, stats, layout_kw, max_rows=max_rows, split=split,
                              cache_dir=cache_dir, hub_config=hub_config)
    train_idx, eval_idx = _split_indices(len(examples), split_eval, seed, shuffle)
    ordered = [examples[k] for k in train_idx + eval_idx]
    tokenized = tokenize_examples(ordered, tokenizer, fmt, loss_on=loss_on, chat_template=chat_template)
    pairs = list(zip(ordered, tokenized))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def make(part):
        samples, locs = _keep_samples(part, seq_length, packing, stats)
        return SFTDataset(samples, seq_length, packing, pad_id, locations=locs, seed=seed, shuffle=shuffle,
                          return_attention_mask=return_attention_mask)

    train_ds = make(pairs[: len(train_idx)])
    eval_ds = make(pairs[len(train_idx):]) if eval_idx else None
    _finish_stats(stats, train_ds, eval_ds, _source_name(path_or_name))
    return train_ds, eval_ds, stats


def _resolve_recipe(fmt: str, packing: Optional[str], loss_on: Optional[str], task: Optional[str]):
    """(packing, loss_on, task preset or None) with the format's defaults; a bad combination is a
    ValueError."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r} ({' | '.join(FORMATS)})")
    packing = packing or ("reference" if fmt == "alpaca" else "boundary")
    if packing not in PACKING_MODES:
        raise ValueError(f"unknown packing {packing!r} ({' | '.join(PACKING_MODES)})")
    if loss_on is None:
        loss_on = "all" if fmt == "alpaca" else "assistant"
    if fmt == "alpaca" and loss_on not in ("all", "response"):
        raise ValueError("alpaca loss_on must be 'all' or 'response'")
    if fmt == "chat" and loss_on != "assistant":
        raise ValueError("chat format trains on assistant tokens only (loss_on='assistant')")
    preset = None
    if task is not None:
        if task not in TASK_PRESETS:
            raise ValueError(f"unknown task {task!r} ({' | '.join(TASK_PRESETS)})")
        preset = TASK_PRESETS[task]
    return packing, loss_on, preset


def _resolve_inputs(path_or_name, tokenizer, seq_length, preset):
    """(data source, tokenizer object, seq_length): the task's hub dataset when no path is given, a
    tokenizer loaded from its path."""
    if path_or_name is None:
        if preset is None:
            raise ValueError("give a data path / hub name, or a task")
        path_or_name = preset.hub_name
    if tokenizer is None:
        raise ValueError("a tokenizer (object or path) is required")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    seq_length = int(seq_length)
    if seq_length < 2:
        raise ValueError("seq_length must be at least 2")
    return path_or_name, tokenizer, seq_length


def _source_name(path_or_name) -> str:
    return str(path_or_name) if isinstance(path_or_name, (str, os.PathLike)) else "dataset"


def _read_examples(path_or_name, fmt: str, stats: SFTDataStats, layout_kw: dict, *, max_rows: Optional[int],
                   split: str, cache_dir: Optional[str], hub_config: Optional[str]) -> list:
    """Rows -> examples; rows with an empty response are counted in `stats` and dropped."""
    layout, layout_source = None, None
    examples = []
    for loc, row in iter_rows(path_or_name, split=split, cache_dir=cache_dir, hub_config=hub_config):
        if max_rows is not None and stats.rows_read >= max_rows:
            break
        stats.rows_read += 1
        source = loc.rsplit(":", 1)[0]
        if layout_source != source:  # layout: explicit, or detected on the first row of each file
            layout_source = source
            layout = resolve_layout(loc, row, **layout_kw)
        ex = row_to_example(loc, row, layout, fmt)
        if ex is EMPTY:
            stats._drop("empty_response", loc)
        else:
            examples.append(ex)
    if stats.rows_read == 0:
        raise DataError(_source_name(path_or_name), "no rows")
    return examples


def _keep_samples(part, seq_length: int, packing: str, stats: SFTDataStats):
    """(tokenized samples, their locations) of one split: empty ones dropped, over-length ones
    dropped (boundary / none) or kept to be split across chunks (reference); all counted in `stats`."""
    samples, locs = [], []
    for ex, t in part:
        if t is None:
            stats._drop("empty_response", ex.location)
            continue
        n = len(t[0])
        stats.max_sample_tokens = max(stats.max_sample_tokens, n)
        if n > seq_length:
            if packing != "reference":
                stats._drop("overlength", ex.location)
                continue
            stats.overlength_split += 1
        samples.append(t)
        locs.append(ex.location)
    return samples, locs


def _finish_stats(stats: SFTDataStats, train_ds: SFTDataset, eval_ds: Optional[SFTDataset], source: str) -> None:
    """Fill the split sizes, log what was dropped; no usable training sample is a DataError."""
    stats.train_samples, stats.train_sequences = train_ds.num_samples, len(train_ds)
    stats.train_tokens, stats.train_loss_tokens = train_ds.num_tokens, train_ds.loss_tokens()
    if eval_ds is not None:
        stats.eval_samples, stats.eval_sequences = eval_ds.num_samples, len(eval_ds)
        stats.eval_tokens, stats.eval_loss_tokens = eval_ds.num_tokens, eval_ds.loss_tokens()
    seq_length = stats.seq_length
    if stats.dropped:
        log.warning("SFT data: dropped %d of %d rows: %d with an empty response%s, %d longer than seq_length %d%s",
                    stats.dropped, stats.rows_read, stats.dropped_empty_response,
                    _where(stats, "empty_response"), stats.dropped_overlength, seq_length,
                    _where(stats, "overlength"))
    if stats.overlength_split:
        log.warning("SFT data: %d samples longer than seq_length %d kept and split across chunks "
                    "(reference packing)", stats.overlength_split, seq_length)
    if train_ds.num_samples == 0:
        raise DataError(source, f"no usable training samples ({stats.dropped} of {stats.rows_read} rows dropped)")
    log.info(stats.summary())


def _where(stats, reason):
    locs = stats.dropped_locations.get(reason)
    return f" (e.g. {', '.join(locs)})" if locs else ""
