"""Tiny random-init models for fast tests, plus access to the shared data folder."""

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

REPO = Path(__file__).resolve().parents[1]


def tiny_model(vocab_size=256, arch="llama", seed=0, hidden=64, layers=2, dtype=torch.float32):
    """A 2-layer decoder with grouped-query attention; `arch="qwen2"` adds q/k/v biases."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=1024, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init with std 0.02 gives near-uniform next-token distributions; larger weights make
    # greedy decoding and sampling tests less degenerate.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def shared_data_dir() -> Path:
    """`$RRR_DATA_DIR`, else `../shared/data` beside the repository; tests that need it skip without it."""
    path = Path(os.environ.get("RRR_DATA_DIR", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not found (set RRR_DATA_DIR)")
    return path


def save_tiny_chat_model(folder: Path, seed=0) -> Path:
    """A tiny random-init Llama with the embedded model's tokenizer and chat template, saved as a Hugging
    Face folder that `--model` accepts: the whole pipeline at test speed."""
    from model import load_tokenizer

    tokenizer = load_tokenizer(None)
    model = tiny_model(vocab_size=len(tokenizer), seed=seed)
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def save_coin_flip_chat_model(folder: Path, seed=0) -> Path:
    """A tiny chat model that ends its turn at each token with probability 1/2, whatever the context: its
    layers add nothing (zero output projections), every embedding is dominated by one large coordinate,
    so the final hidden state is the same for every token, and the untied head scores only EOS, at
    log(V - 1), against 0 for the V - 1 other tokens."""
    import math

    from model import load_tokenizer

    tokenizer = load_tokenizer(None)
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.normal_(0, 0.01)[:, 0] = 100.0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        # After the final RMSNorm the first coordinate is sqrt(hidden) = 8 (up to 1e-6).
        model.lm_head.weight[tokenizer.eos_token_id, 0] = math.log(vocab - 1) / 8
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
