"""Restoring the per-rank optimizer state when the param groups changed (issue 12 item 4 follow-up).

The CE tables now have a param group of their own: a checkpoint from before has the same tensors in
fewer groups, which must mean "start the optimizer fresh" (a reason string), not a crash. And a
resumed run's group settings (e.g. a changed --moe-ce-lr-mult) must win over the saved ones, which
torch's load_state_dict would otherwise restore.
"""

from types import SimpleNamespace

import torch

from megatron_ce.training.checkpoint import load_optimizer_rank_state


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.ones(4, 2))]


def _saved(groups):
    """What optimizer_rank_state writes for a torch Adam over `groups` after one step."""
    inner = torch.optim.AdamW(groups, lr=1e-3)
    for g in inner.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    inner.step()
    params = [p for g in inner.param_groups for p in g["params"]]
    return [dict(inner=inner.state_dict(), shapes=[list(p.shape) for p in params],
                 main_params=[None] * len(params), grad_scaler=None)]


def test_other_grouping_is_a_reason_not_a_crash():
    w, theta = _params()
    saved = _saved([{"params": [w, theta]}])  # before: theta in the default group
    now = SimpleNamespace(optimizer=torch.optim.AdamW([{"params": [w]}, {"params": [theta], "lr_mult": 10.0}]))
    assert load_optimizer_rank_state(now, saved) == "the optimizer's parameter groups differ"


def test_this_runs_group_settings_win():
    w, theta = _params()
    saved = _saved([{"params": [w]}, {"params": [theta], "lr_mult": 1.0, "wd_mult": 0.0}])
    inner = torch.optim.AdamW([{"params": [w]}, {"params": [theta], "lr_mult": 10.0, "wd_mult": 0.0}], lr=5e-4)
    assert load_optimizer_rank_state(SimpleNamespace(optimizer=inner), saved) is None
    assert inner.param_groups[1]["lr_mult"] == 10.0 and inner.param_groups[1]["lr"] == 5e-4
    assert int(inner.state[theta]["step"]) == 1 and inner.state[theta]["exp_avg"].abs().sum() > 0  # state restored
