"""Shared fixtures. The suite runs in two pytest-xdist workers (README: ``-n 2 --dist loadfile``):
each test file stays on one worker (its module fixtures are computed once), and the session's
nnU-Net tree and its trained model are made once for both workers, under a file lock, in the
run's common temporary folder."""
import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from nnunet_tree import DATASET_ID, SHARED_TRAINER, NNUNetTree, make_tree

#: intra-op threads per test process: the two cores shared by the xdist workers (OpenMP threads
#: that wait for a busy core spin and slow every process down several times)
THREADS = max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(THREADS)


#: the longest files first, so that the two workers end together (xdist hands out files in this order)
LONGEST_FIRST = ("e2e/test_attack_cli.py", "e2e/test_configurations.py", "e2e/test_e2e_recipes.py",
                 "e2e/test_study.py", "faults/", "e2e/test_ecosystem.py", "e2e/test_e2e_training.py",
                 "e2e/test_evaluate_cli.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        path = item.path.as_posix()
        return next((i for i, part in enumerate(LONGEST_FIRST) if f"/tests/{part}" in path), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the order inside a file stays


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: thread hand-offs cost more than they
    save there, and much more when the two cores are shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run_folder(tmp_path_factory) -> Path:
    """The temporary folder of the whole run: the workers' common parent under xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _once(tmp_path_factory, key: str, make) -> None:
    """Run ``make()`` once in the whole run: under xdist one worker makes it while the other waits
    on the lock, then both go on (a marker file in the run folder says it is made)."""
    folder = _run_folder(tmp_path_factory)
    with FileLock(str(folder / f"{key}.lock")):
        if not (folder / f"{key}.done").is_file():
            make()
            (folder / f"{key}.done").touch()


@pytest.fixture(scope="session")
def nnunet_tree(tmp_path_factory):
    """A preprocessed real-MRI nnU-Net dataset (3d_fullres and 2d) shared by the tests."""
    root = _run_folder(tmp_path_factory) / "nnunet"
    _once(tmp_path_factory, "nnunet_tree", lambda: make_tree(root, threads=THREADS))
    return NNUNetTree(root, threads=THREADS)


@pytest.fixture(scope="session")
def shared_model(nnunet_tree, tmp_path_factory):
    """The tree with :data:`SHARED_TRAINER` trained once on 3d_fullres fold 0 by the stock
    ``nnUNetv2_train``: the model every end-to-end module attacks, evaluates or predicts with."""
    _once(tmp_path_factory, "shared_model", lambda: nnunet_tree.run(
        "nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", SHARED_TRAINER, "-device", "cpu"))
    return nnunet_tree
