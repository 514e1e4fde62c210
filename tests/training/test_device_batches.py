"""Batches, loss sums and their all-reduces live on the model's device (issue 12 item 1).

A stub model whose parameters live on the `meta` device stands in for a GPU model on this CPU-only
machine: any tensor the trainer leaves on the CPU shows up as a CPU tensor at the model, in the loss
or at the all-reduce (with a real GPU, the same mistake is a device-mismatch error or a CPU tensor
handed to NCCL).
"""

from argparse import Namespace

import pytest
import torch

from megatron_ce.training import loop
from megatron_ce.training.data import collate

META = torch.device("meta")
SEQ = 8


class RecordingModel(torch.nn.Module):
    """Parameters on `meta`; records the device of every input tensor it gets."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(4, 4, device=META))
        self.seen = []

    def forward(self, tokens, position_ids, attention_mask, labels=None):
        inputs = dict(tokens=tokens, position_ids=position_ids, attention_mask=attention_mask, labels=labels)
        self.seen.append({k: v.device for k, v in inputs.items() if v is not None})
        return torch.zeros(labels.shape, device=self.w.device)  # per-token losses, like GPTModel


def _item(i):
    return dict(tokens=torch.arange(SEQ) + i, labels=torch.arange(SEQ) + i + 1, loss_mask=torch.ones(SEQ),
                position_ids=torch.arange(SEQ), document_ids=torch.tensor([0] * 4 + [1] * 4))


def test_forward_step_moves_every_tensor_to_the_model_device():
    model = RecordingModel()
    batch = collate([_item(0), _item(1)], with_mask=True)  # boundary packing: with an attention mask
    assert all(v.device.type == "cpu" for v in batch.values())
    output, loss_fn = loop.forward_step(iter([batch]), model)
    assert model.seen == [dict(tokens=META, position_ids=META, attention_mask=META, labels=META)]
    loss_sum, tokens, logged = loss_fn(output)  # loss mask must be on the model's device too
    assert loss_sum.device == META and tokens.device == META and logged["lm loss"].device == META


@pytest.fixture
def fake_schedule(monkeypatch):
    """megatron-core's schedule replaced by a plain loop over forward_step; records the device of every
    tensor all-reduced."""
    from megatron.core import parallel_state as ps
    import megatron.core.pipeline_parallel as pp

    def fwd_bwd(forward_step_func, data_iterator, model, num_microbatches, **_):
        out = []
        for _ in range(num_microbatches):
            output, loss_fn = forward_step_func(data_iterator, model[0])
            out.append(loss_fn(output)[2])
        return out

    reduced = []
    monkeypatch.setattr(pp, "get_forward_backward_func", lambda: fwd_bwd)
    monkeypatch.setattr(ps, "is_pipeline_last_stage", lambda *a, **k: True)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ps, "get_data_parallel_rank", lambda *a, **k: 0)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: reduced.append(t.device))
    return reduced


ARGS = Namespace(seq_length=SEQ, micro_batch_size=1, global_batch_size=2, data_parallel_size=1, eval_iters=None)


def test_run_schedule_reduces_on_the_model_device(fake_schedule):
    model = RecordingModel()
    sums = loop.run_schedule(model, [collate([_item(0)], False), collate([_item(1)], False)], ARGS, False)
    assert fake_schedule == [META] and sums.device == META and sums.dtype == torch.float64
    assert all(d == META for seen in model.seen for d in seen.values())


def test_evaluate_accumulates_on_the_model_device(fake_schedule):
    model = RecordingModel()
    total = loop.evaluate(model, [_item(i) for i in range(3)], ARGS)  # 2 eval batches, the last padded
    assert total.device == META and fake_schedule == [META, META]


def test_model_device_and_mean_loss():
    from megatron_ce.training.data import model_device

    assert model_device(RecordingModel()) == META
    assert model_device(torch.nn.ReLU()).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loop.mean_loss(torch.tensor([3.0, 4.0], dtype=torch.float64)) == 0.75
    assert loop.mean_loss(torch.zeros(2, dtype=torch.float64)) != loop.mean_loss(torch.zeros(2))  # nan != nan
