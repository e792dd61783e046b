import os
import sys
from pathlib import Path

# Must be set before anything imports huggingface_hub: a hub miss otherwise retries for tens of seconds.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Helper modules the tests import by name (launch_utils, dash_models, ...) live in tests/scripts/, beside
# the scripts the tests launch; tests/ itself holds only the test files (test_structure.py checks it).
sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


# diffusers and transformers bind their root logger's one StreamHandler to the sys.stderr of the
# moment they first log. Under pytest that can be one test's capture stream, closed when that test
# ends: every later library log line then prints "--- Logging error ---" into whatever runs next
# (seen: the disk-full test's one-line error check after a DreamBooth run under capsys). Binding them
# here, while pytest's session-wide capture is in place, keeps one open stream for the whole run.
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

_diffusers_logging.get_logger("diffusers")
_transformers_logging.get_logger("transformers")


@pytest.fixture(scope="module")
def db():
    """train/dreambooth_dash.py, imported afresh for each test module that asks for it."""
    from launch_utils import load_script

    return load_script("train/dreambooth_dash.py")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a module of tiny-model tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): the numerics of the OMP_NUM_THREADS=1 subprocesses, and on
    a busy 2-core machine OpenMP's waiting threads made each 4-step app render take seconds instead of
    ~0.1 s (measured)."""
    from launch_utils import one_torch_thread

    with one_torch_thread():
        yield
