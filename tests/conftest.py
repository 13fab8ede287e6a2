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


@pytest.fixture(scope="session")
def tiny_llama():
    return headlab.load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gemma3():
    return headlab.load_model("tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_bert():
    return headlab.load_model("tiny-bert")


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gemma3", "tiny-bert"])
def tiny(request):
    return headlab.load_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    return headlab.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    return headlab.load_model("gemma3-270m")
