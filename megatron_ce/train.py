"""SFT entry point: `python -m megatron_ce.train ...` or `torchrun --nproc-per-node N -m megatron_ce.train ...`.

Megatron-LM flag names; see `python -m megatron_ce.train --help` and megatron_ce/training/.
Exit codes: 0 done (or stopped by --exit-signal-handler after saving), 2 bad flag / configuration /
data / checkpoint (one line naming the flag or file), 3 stopped on a non-finite loss, 4 a checkpoint
save failed (disk full, I/O error); with 3 and 4 the last good checkpoint is kept.
"""

from __future__ import annotations

import sys
import warnings


def main(argv=None) -> int:
    """Under torchrun, wrapped in its @record: an uncaught exception of a rank (e.g. a collective that
    lost its peer) goes to torchrun's error file, so its failure summary shows the message, not only the
    exit code. Outside torchrun, torch is not imported before the flags are checked (fast errors)."""
    import os

    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_main)(argv)
    return _main(argv)


def _main(argv=None) -> int:
    from megatron_ce.training.args import ArgError, exit_on_arg_error, parse_args

    try:
        args = parse_args(argv)
    except ArgError as e:
        exit_on_arg_error(e)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megatron_ce.runtime.quiet import silence_unknown_mlp_type

    silence_unknown_mlp_type()
    import torch

    from megatron_ce.data import DataError
    from megatron_ce.training.checkpoint import CheckpointError, CheckpointSaveError
    from megatron_ce.training.loop import TrainingStopped, train

    code = 0
    try:
        train(args)
    except ArgError as e:
        exit_on_arg_error(e)
    except DataError as e:
        print(f"megatron_ce.train: data error: {e}", file=sys.stderr, flush=True)
        code = 2
    except CheckpointError as e:
        print(f"megatron_ce.train: checkpoint error: {e}", file=sys.stderr, flush=True)
        code = 4 if isinstance(e, CheckpointSaveError) else 2
    except TrainingStopped as e:
        print(f"megatron_ce.train: {e}", file=sys.stderr, flush=True)
        code = 3
    finally:
        from megatron_ce.runtime import destroy_parallel

        if torch.distributed.is_initialized() and code == 0:
            destroy_parallel()
    return code


if __name__ == "__main__":
    sys.exit(main())
