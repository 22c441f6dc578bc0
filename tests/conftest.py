import json

import pytest
import torch


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct in fp32: (model, tokenizer)."""
    from model import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_model(None, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """The planted-reflection model (tiny.py) and a data folder holding its one puzzle 8 times per split:
    made once per session (its short fine-tuning takes seconds), shared by every module that trains it."""
    from tiny import PLANTED_PUZZLE, save_planted_reflection_model

    folder = tmp_path_factory.mktemp("planted")
    model = save_planted_reflection_model(folder / "model")
    data = folder / "data" / "countdown"
    data.mkdir(parents=True)
    for split in ("train", "test"):
        (data / f"countdown_3to4_{split}.jsonl").write_text((json.dumps(PLANTED_PUZZLE) + "\n") * 8)
    return model, folder / "data"
