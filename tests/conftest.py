import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by every integration test of the run (Ray takes ~10-15 s to start here)."""
    import ray

    started = not ray.is_initialized()
    if started:
        # 4 logical CPUs on 2 cores: 2 train workers + room for Ray Data read tasks and small actors.
        # address="local": never join a cluster that `ray start` left running on this machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()
