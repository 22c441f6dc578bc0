import pytest
import torch


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct in fp32: (model, tokenizer)."""
    from model import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model(None, device="cpu", dtype=torch.float32)
