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


PLANTED_PUZZLE = dict(nums=[2, 3], target=5)
PLANTED_REFLECTIONS = {"Add them.": "<answer> 2 + 3 </answer>",          # the retry it leads to: right
                       "Multiply them.": "<answer> 2 * 3 </answer>"}     # and wrong
PLANTED_FIRST_TRY = "<answer> 2 * 3 </answer>"


def save_planted_reflection_model(folder: Path, steps=60, seed=0) -> Path:
    """A tiny chat model with a planted skill that only a reflection can unlock, for the one Countdown puzzle
    PLANTED_PUZZLE, in exactly the token sequences rrr.py builds: its first try is wrong; asked to reflect,
    it writes one of the two PLANTED_REFLECTIONS about half the time each; its retry is right after the
    first and wrong after the second. So reflections disagree in every group, and a correct RRR update
    raises the chance of the good reflection, hence the reward. Made by a short supervised fine-tuning
    (full batch, Adam) of a random-init tiny model; the loss is on the planted turns only."""
    from conversation import turn
    from data import get_task
    from data.countdown import prompt
    from model import chat_ids, load_model

    save_tiny_chat_model(folder, seed=seed)
    model, tok = load_model(str(folder), device="cpu", dtype=torch.float32)
    task, eos = get_task("countdown"), tok.eos_token_id

    def turn_of(text):
        return list(tok(text, add_special_tokens=False)["input_ids"]) + [eos]

    asked = chat_ids(tok, prompt(**PLANTED_PUZZLE))
    reflect = asked + turn_of(PLANTED_FIRST_TRY) + list(turn(tok, task.reflection_prompt, eos))
    rows = [(asked, turn_of(PLANTED_FIRST_TRY))]
    for reflection, retry in PLANTED_REFLECTIONS.items():
        rows.append((reflect, turn_of(reflection)))
        rows.append((reflect + turn_of(reflection) + list(turn(tok, task.retry_prompt, eos)), turn_of(retry)))
    length = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), length), eos)
    attention, target = torch.zeros_like(ids), torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (p, t) in enumerate(rows):
        ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        attention[i, :len(p) + len(t)] = 1
        target[i, len(p):len(p) + len(t)] = True
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
        logits = model.lm_head(hidden[target[:, 1:]])       # (planted tokens, V): only where the loss is
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][target[:, 1:]])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    return Path(folder)

