"""Run the real launch script (launch/sft_olmoe_ce.sh -> torchrun -> megatron_ce.train) on CPU, as one
or several "nodes" on this machine (NNODES, NODE_RANK, MASTER_ADDR=127.0.0.1), each a process group
of its own with a hard timeout."""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from tests.training.conftest import DATA, REPO, _free_port, kill_group

ITERS = 6
# The tiny OLMoE-CE of the main job (4 layers, 32 experts, top-8 = 4 main + 4 compressed), fp32 on gloo.
CPU_ENV = dict(
    MODEL_CONFIG="launch/configs/olmoe_tiny.json", TOKENIZER=str(DATA / "tokenizer"),
    DATA_PATH=str(DATA / "sft_tiny.jsonl"), EP="2", TP="1", PP="1", N_CE="4", SEQ_LENGTH="128",
    GLOBAL_BATCH="8", MICRO_BATCH="2", TRAIN_ITERS=str(ITERS), PRECISION="fp32", GROUPED_GEMM="0",
    TRANSFORMER_IMPL="local", LOG_INTERVAL="1", EVAL_INTERVAL="1000", SAVE_INTERVAL="2", LR="1e-3",
    MASTER_ADDR="127.0.0.1", DIST_TIMEOUT_MINUTES="1", SHUTDOWN_TIMEOUT="60",
    # Every checkpoint stays (the tests below look at them); also keeps --keep-last-checkpoints, which the
    # model scripts pass by default, off the command line.
    KEEP_CHECKPOINTS="0",
)
_DROP = ("NNODES", "NODE_RANK", "GPUS_PER_NODE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT",
         "MEGATRON_CE_FAULT")


class Node:
    """One launch-script process ("node"); output goes to a log file that tests can poll."""

    def __init__(self, log: Path, env: Dict[str, str]):
        self.log = log
        self._f = open(log, "w")
        self.proc = subprocess.Popen(["bash", "launch/sft_olmoe_ce.sh"], cwd=REPO, env=env, stdout=self._f,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.exited_at: Optional[float] = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def poll(self) -> Optional[int]:
        rc = self.proc.poll()
        if rc is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
            self._f.close()
        return rc

    def kill(self):
        kill_group(self.proc)
        self.poll()


def start(save: Path, nnodes: int, per_node: int, **env) -> List[Node]:
    port = str(_free_port())
    base = {k: v for k, v in os.environ.items() if k not in _DROP}
    # torchrun and plan.py from this interpreter's environment.
    base.update(CPU_ENV, PATH=f"{Path(sys.executable).parent}:{base['PATH']}", PYTHON=sys.executable,
                PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SAVE=str(save),
                NNODES=str(nnodes), GPUS_PER_NODE=str(per_node), MASTER_PORT=port)
    base.update(env)
    save.mkdir(parents=True, exist_ok=True)
    return [Node(save.parent / f"{save.name}.node{r}.log", dict(base, NODE_RANK=str(r))) for r in range(nnodes)]


def wait_all(nodes: List[Node], timeout: float) -> List[int]:
    """Exit codes; on timeout every node is killed and the test fails with their logs."""
    deadline = time.monotonic() + timeout
    while any(n.poll() is None for n in nodes):
        if time.monotonic() > deadline:
            for n in nodes:
                n.kill()
            logs = "\n".join(f"--- node {i}\n{n.text()[-3000:]}" for i, n in enumerate(nodes))
            raise AssertionError(f"launch did not finish in {timeout}s:\n{logs}")
        time.sleep(0.1)
    return [n.proc.returncode for n in nodes]


def run(save: Path, nnodes: int, per_node: int, timeout: float = 300, **env) -> List[Node]:
    nodes = start(save, nnodes, per_node, **env)
    codes = wait_all(nodes, timeout)
    assert codes == [0] * nnodes, "\n".join(f"--- node {i} (exit {c})\n{n.text()[-4000:]}"
                                            for i, (n, c) in enumerate(zip(nodes, codes)))
    return nodes


def wait_for(nodes: List[Node], text: str, timeout: float) -> float:
    """Time (monotonic) at which `text` appeared in some node's log."""
    deadline = time.monotonic() + timeout
    while not any(text in n.text() for n in nodes):
        if any(n.poll() is not None for n in nodes) or time.monotonic() > deadline:
            for n in nodes:
                n.kill()
            raise AssertionError(f"{text!r} never appeared:\n" + "\n".join(n.text()[-3000:] for n in nodes))
        time.sleep(0.05)
    return time.monotonic()
