"""The tied-theta control of the reproduction (examples/reproduce/model.py tie_theta_rows): every
expert's theta row stays one shared vector through SFT, so the auxiliary experts' identity cannot
matter, while an untied run (the CE rows) moves the rows apart."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROG = textwrap.dedent("""
    import random, sys
    sys.path[:0] = [{repo!r}, {examples!r}]
    import torch
    import reproduce_tradeoff as R
    from megatron_ce.runtime import init_parallel
    from reproduce import model as M
    from reproduce.tasks import make_splits, sft_batch

    init_parallel(seed=1234)
    a = R.parse(["--quick"])
    _, _, sample = make_splits(a.n_test, a.n_val, a.digits)
    for tied in (False, True):
        torch.manual_seed(0)
        m = M.build(a, 4, 2, aux=0.0)
        if tied:
            M.tie_theta_rows(m)
        rng = random.Random(0)
        M.train(m, 4, 1e-2, lambda s: sft_batch([sample(rng) for _ in range(8)]), "t", 10, ce_lr_mult=30.0)
        tables = M.ce_tables(m)
        spread = max(float((t - t[:1]).abs().max()) for t in tables)
        moved = max(float((t - 1).abs().max()) for t in tables)
        print(f"RESULT tied={{tied}} spread={{spread:.3e}} moved={{moved:.3e}}")
""")


def test_tied_theta_rows_stay_equal_and_move():
    prog = PROG.format(repo=REPO, examples=os.path.join(REPO, "examples"))
    proc = subprocess.run([sys.executable, "-c", prog], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            kv = dict(x.split("=") for x in line.split()[1:])
            res[kv["tied"]] = (float(kv["spread"]), float(kv["moved"]))
    untied, tied = res["False"], res["True"]
    assert untied[0] > 1e-3 and untied[1] > 1e-2  # CE rows: each expert's own theta moves its own way
    assert tied[0] == 0.0 and tied[1] > 1e-2  # control: one shared row per table, trained
