import os
import sys
from pathlib import Path

import pytest
import torch  # noqa: E402

os.environ.setdefault("HEADLAB_PROGRESS", "0")
if not torch.cuda.is_available():  # must be set before any Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/planted.py

import headlab  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def session_model(name: str):
    """A session fixture that loads `name` once."""
    @pytest.fixture(scope="session")
    def fixture():
        return headlab.load_model(name)
    return fixture


tiny_llama = session_model("tiny-llama")
tiny_gemma3 = session_model("tiny-gemma3")
tiny_bert = session_model("tiny-bert")
smollm2 = session_model("smollm2-135m")
gemma3 = session_model("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_gpt_oss(tmp_path_factory):
    """A tiny random gpt-oss with learned sinks (tests/gpt_oss.py), saved and loaded through headlab."""
    from gpt_oss import build_tiny_gpt_oss

    return build_tiny_gpt_oss(tmp_path_factory.mktemp("gpt-oss"))


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gemma3", "tiny-bert"])
def tiny(request):
    return headlab.load_model(request.param)
