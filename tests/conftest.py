import os
import warnings

import lightning.pytorch  # noqa: F401
import pytest

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
