"""Packing: token conservation, position resets, block-diagonal attention, packed == unpacked loss."""

import collections

import numpy as np
import pytest
import torch

from megatron_ce.data import (SFTDataset, best_fit_decreasing, build_sft_dataset, cu_seqlens_from_document_ids,
                              packed_attention_mask, unpad_cu_seqlens)

from .conftest import EXAMPLES
from .helpers import TinyCausalLM, causal_mask, collate, stream_of

CHAT = str(EXAMPLES / "chat_tiny.jsonl")
ALPACA = str(EXAMPLES / "sft_tiny.jsonl")


def check_boundary_rows(ds):
    """Every sample appears exactly once, whole, with positions 0..n-1, its own document id, labels
    shifted inside the sample, no target on its last token; cu_seqlens match the documents."""
    S = ds.seq_length
    seen = collections.Counter()
    for i in range(len(ds)):
        item = ds[i]
        doc, pos = item["document_ids"], item["position_ids"]
        cu = unpad_cu_seqlens(item["cu_seqlens"])
        assert cu.equal(cu_seqlens_from_document_ids(doc)) and int(cu[-1]) == S
        off = 0
        for d, k in enumerate(ds.row_samples(i)):
            seen[k] += 1
            ids, flags = ds.sample(k)
            n = len(ids)
            sl = slice(off, off + n)
            assert item["tokens"][sl].tolist() == ids.tolist()
            assert pos[sl].tolist() == list(range(n))  # position ids reset at every boundary
            assert doc[sl].eq(d).all()
            assert item["labels"][off: off + n - 1].tolist() == ids[1:].tolist()
            assert item["loss_mask"][off: off + n - 1].tolist() == flags[1:].tolist()
            assert item["loss_mask"][off + n - 1] == 0
            off += n
        assert doc[off:].eq(-1).all() and item["loss_mask"][off:].eq(0).all()
        assert item["tokens"][off:].eq(ds.pad_id).all()
    assert seen == collections.Counter(range(ds.num_samples))


@pytest.mark.parametrize("fmt,path", [("alpaca", ALPACA), ("chat", CHAT)])
@pytest.mark.parametrize("packing", ["boundary", "none"])
def test_boundary_and_unpacked_conserve_tokens(tok, fmt, path, packing):
    train, ev, stats = build_sft_dataset(path, tok, 96, fmt=fmt, packing=packing, split_eval=0.1, seed=7)
    for ds in (train, ev):
        check_boundary_rows(ds)
    assert stats.train_tokens == train.num_tokens and stats.eval_samples == ev.num_samples
    assert stats.train_loss_tokens == sum(float(train[i]["loss_mask"].sum()) for i in range(len(train)))
    if packing == "boundary":
        assert len(train) < train.num_samples  # actually packed


def test_reference_packing_conserves_stream(tok):
    train, _, stats = build_sft_dataset(ALPACA, tok, 100, fmt="alpaca", packing="reference", seed=5)
    stream = stream_of(train)
    got = np.concatenate([train[i]["tokens"][train[i]["document_ids"] >= 0].numpy() for i in range(len(train))])
    np.testing.assert_array_equal(got, stream)
    assert stats.train_tokens == len(stream) == train.num_tokens
    # no separator other than each sample's eos
    assert (stream == tok.eos_token_id).sum() == train.num_samples


def test_block_diagonal_mask_never_crosses_a_boundary():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]])
    m = packed_attention_mask(doc)
    assert m.shape == (2, 1, 11, 11) and m.dtype == torch.bool
    for b in range(2):
        for i in range(11):
            for j in range(11):
                allowed = bool(doc[b, i] == doc[b, j]) and j <= i
                assert bool(m[b, 0, i, j]) == (not allowed)
    assert not m.all(-1).any()  # every query (padding included) attends to something: no NaN rows
    assert packed_attention_mask(doc[0]).equal(m[:1])
    assert not packed_attention_mask(doc, causal=False)[0, 0, 0, 2]


def test_dataset_attention_mask_matches_document_ids(tok):
    train, _, _ = build_sft_dataset(CHAT, tok, 64, fmt="chat", return_attention_mask=True)
    for i in range(3):
        item = train[i]
        assert item["attention_mask"].shape == (1, 64, 64)
        assert item["attention_mask"].equal(packed_attention_mask(item["document_ids"])[0])


def test_best_fit_decreasing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=500)
    bins = best_fit_decreasing(lengths, 64)
    assert sorted(k for b in bins for k in b) == list(range(500))
    assert all(sum(lengths[k] for k in b) <= 64 for b in bins)
    assert len(bins) <= np.ceil(lengths.sum() / 64) * 1.1 + 1  # near-optimal fill
    assert bins == best_fit_decreasing(lengths, 64)
    with pytest.raises(ValueError):
        best_fit_decreasing([65], 64)


def _per_sample_losses(model, ds, mask_fn):
    """{sample index: mean loss over its loss-masked targets} from every row of `ds`."""
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        tl = model.token_losses(batch, mask_fn(batch))
    out = {}
    for i in range(len(ds)):
        for d, k in enumerate(ds.row_samples(i)):
            sel = (batch["document_ids"][i] == d) & (batch["loss_mask"][i] > 0)
            out[k] = (tl[i][sel].sum() / sel.sum()).item()
    return out


@pytest.mark.parametrize("fmt,path", [("alpaca", ALPACA), ("chat", CHAT)])
def test_packed_equals_unpacked_loss_with_tiny_lm(tok, fmt, path):
    S = 128
    base, _, _ = build_sft_dataset(path, tok, S, fmt=fmt, packing="none", max_rows=60, seed=1)
    samples = [base.sample(k) for k in range(base.num_samples)]
    packed = SFTDataset(samples, S, "boundary", tok.pad_token_id, seed=1)
    unpacked = SFTDataset(samples, S, "none", tok.pad_token_id)
    assert len(packed) < len(unpacked)
    model = TinyCausalLM(len(tok), S)
    block = lambda b: packed_attention_mask(b["document_ids"])  # noqa: E731
    lp = _per_sample_losses(model, packed, block)
    lu = _per_sample_losses(model, unpacked, block)
    assert lp.keys() == lu.keys() == set(range(len(samples)))
    for k in lp:
        assert abs(lp[k] - lu[k]) < 1e-5, (k, lp[k], lu[k])
    # the check has teeth: a plain causal mask over the packed rows (attention across samples)
    # changes the losses of every sample that is not first in its row
    lc = _per_sample_losses(model, packed, lambda b: causal_mask(b["tokens"].shape[1]))
    later = [k for i in range(len(packed)) for k in packed.row_samples(i)[1:]]
    assert later and all(abs(lc[k] - lu[k]) > 1e-6 for k in later)
