"""Shared fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer, image_processor) of the tiny random InternVL, fp32, eval mode."""
    from engine import load_model

    model, tok, proc = load_model("tiny", seed=0)
    model.eval()
    return model, tok, proc


@pytest.fixture(scope="session")
def tiny_model(tiny):
    return tiny[0]


@pytest.fixture(scope="session")
def tiny_tok(tiny):
    return tiny[1]
