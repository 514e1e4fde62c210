import pytest


@pytest.fixture(scope="session")
def world1():
    """A one-rank gloo world with megatron-core parallel state (TP=PP=EP=1)."""
    from megatron_ce.runtime import init_parallel

    init_parallel(seed=1234)
    yield
