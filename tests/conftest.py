import os
import warnings

import lightning.pytorch  # noqa: F401
import pytest

from tests._app import fresh_hydra  # noqa: F401 (a fixture for every test module that runs Hydra in process)

# Lightning binds a StreamHandler to sys.stderr when first imported. Importing it here binds it to the session's
# stream; imported first inside a test, it would bind to that test's captured stream, closed afterwards.

# Real wandb, offline: writes run files under the test's tmp dir, never touches the network.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@pytest.fixture(autouse=True)
def _isolated_run_dirs(tmp_path, monkeypatch):
    """Each test writes logs, checkpoints and wandb files under its own tmp dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: reductions then sum in one order, for bit-exact comparisons."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """float64 as torch's default dtype for the test: exact comparisons with written-out formulas."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
