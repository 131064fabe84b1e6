import os
import warnings

# One intra-op thread, in this process and in every process a test starts (they inherit the environment): the
# suite's tensors are tiny, and two OpenMP threads per op spin-wait on each other whenever the 2 cores are busy (a
# test's own second process, another job): the shrink_traced ResNet fit took 24.5 s of CPU with 2 threads, 1.8 s
# with one, on a loaded machine. Set before torch is imported, so that its thread pool starts at one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Lightning binds a StreamHandler to sys.stderr when first imported. Importing it here binds it to the session's
# stream; imported first inside a test, it would bind to that test's captured stream, closed afterwards.
import lightning.pytorch  # noqa: E402, F401
import pytest  # noqa: E402
import torch  # noqa: E402

from tests._app import fresh_hydra  # noqa: E402, F401 (a fixture for every test module that runs Hydra in process)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also if torch was imported before this file

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
