"""Runtime helpers: CPU shims for megatron-core and parallel-state set-up."""

from megatron_ce.runtime.cpu_shims import apply_cpu_shims
from megatron_ce.runtime.parallel import destroy_parallel, init_parallel

__all__ = ["apply_cpu_shims", "init_parallel", "destroy_parallel"]
