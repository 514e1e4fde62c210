"""Shared helpers for the data tests."""

import json

import numpy as np
import torch
import torch.nn.functional as F


def write_jsonl(path, rows):
    """Rows as JSON lines; a str row is written verbatim (for malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def assistant_text(messages, eos):
    return "".join(m["content"] + eos for m in messages if m["role"] == "assistant")


def masked_target_ids(item):
    """Target ids that are trained on in one dataset item."""
    return item["labels"][item["loss_mask"] > 0].tolist()


class TinyCausalLM(torch.nn.Module):
    """One pre-norm transformer layer with learned absolute positions (so position ids matter) and an
    explicit boolean attention mask (True = masked, Megatron convention)."""

    def __init__(self, vocab, seq, d=32, heads=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(seq, d)
        self.ln1, self.ln2, self.lnf = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.head = torch.nn.Linear(d, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.double()

    def forward(self, tokens, position_ids, mask):
        b, s = tokens.shape
        x = self.emb(tokens) + self.pos(position_ids)
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, s, -1))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.lnf(x))

    def token_losses(self, batch, mask):
        logits = self.forward(batch["tokens"], batch["position_ids"], mask)
        return F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")


def causal_mask(s):
    return torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def stream_of(ds):
    return np.concatenate([ds.sample(k)[0] for k in range(ds.num_samples)]) if ds.num_samples else np.zeros(0)
