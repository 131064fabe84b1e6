import functools
import os
import warnings
from pathlib import Path

import pytest

from tests._app import fresh_hydra  # noqa: F401 (a fixture for every test module that runs Hydra in process)

# One intra-op thread, in this process and in every process a test starts (they inherit the environment): the
# suite's tensors are tiny, and two OpenMP threads per op spin-wait on each other whenever the 2 cores are busy (a
# test's own second process, another job): the shrink_traced ResNet fit took 24.5 s of CPU with 2 threads, 1.8 s
# with one, on a loaded machine. Set before torch is imported, so that its thread pool starts at one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Real wandb, offline: writes run files under the test's tmp dir, never touches the network.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def pytest_sessionstart(session):
    if session.config.pluginmanager.has_plugin("dsession"):
        return  # the pytest-xdist controller runs no test: it need not pay for importing torch and Lightning
    # Lightning binds a StreamHandler to sys.stderr when first imported. Importing it here binds it to the session's
    # stream; imported first inside a test, it would bind to that test's captured stream, closed afterwards.
    import lightning.pytorch  # noqa: F401
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also if torch was imported before this file


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


@functools.cache
def _xdist_group(path: str) -> str:
    """The unit of work a test file belongs to under pytest-xdist: the file itself, or the name of a session-wide
    resource it shares with other files (the DDP processes of ``tests._spawn``, the fresh interpreter of
    ``tests._fresh_process``), so that all of them run on one worker and the resource starts once."""
    file = Path(__file__).parents[1] / path
    if file.suffix == ".py" and file.parent.name == "tests":
        text = file.read_text()
        for shared in ("run_on_ranks", "import_facts"):
            if shared in text:
                return shared
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n 2`` (the README's command): each test file runs whole on one worker, so its module-scoped fits are built
    once; the files on the DDP processes run on one worker; files are handed out in the order collected (see
    ``pytest_collection_modifyitems``), the next to the first worker that is almost done."""
    if config.getoption("dist") != "load":  # an explicit other --dist is left to pytest-xdist
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_group(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False  # keep the order below, not the largest test count first
    return ByFile(config, log)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the files with slow tests (multi-process and end-to-end runs) come first, so that the two
    workers end together rather than one waiting on the other's last long run. Stable: the order is kept otherwise."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
