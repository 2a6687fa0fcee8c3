"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` (scripts/test.sh) two workers share the machine's cores: each worker, and every
    # process it starts (CLI runs, Ray workers, deployed clients), computes with one thread, so that
    # OpenMP threads do not oversubscribe the cores and spin against each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with end-to-end (``slow``) tests first, so that ``--dist loadfile`` starts the long files early
    and the short ones fill the gaps (longest-first scheduling); order within a file is kept."""
    heavy = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in heavy)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """Path of the real GLUE data: ``$FEDTUNE_DATA_DIR``, else ``<repo>/../shared/data/glue``.

    Fails (never skips) when the folder is missing: CI always has it.
    """
    env = os.environ.get("FEDTUNE_DATA_DIR")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "glue"
    if not path.is_dir():
        origin = "FEDTUNE_DATA_DIR" if env else "the default <repo>/../shared/data/glue"
        pytest.fail(
            f"GLUE data folder {path} (from {origin}) does not exist; set FEDTUNE_DATA_DIR "
            "to the GLUE root (the folder holding sst2/, qnli/, ...)",
            pytrace=False,
        )
    return path


@pytest.fixture
def flower_task_identity() -> Iterator[None]:
    """Give Flower's ``TaskIdentity`` a run, task and node id, so tests can build Messages outside an app
    (restored afterwards)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One torch thread for a module of tiny models: they train ~10x faster so on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
