"""Generated tokens/s of sampler.generate against HF `model.generate`, same model, prompts and settings.

Running time with the defaults: not timed as a whole; the timed calls alone come to about 3 minutes on a
2-core Intel Xeon with AMX (B in BENCHMARKS.md), fp32 (2 repeats of each side at the tokens/s measured
there), plus loading, warm-ups and the op counts.

    python bench/sampler.py                       # embedded SmolLM2-135M, fp32, CPU, batch 1 8 32
    python bench/sampler.py --batch-sizes 32 --new-tokens 64
    python bench/sampler.py --random-init --dtype bfloat16   # on a GPU: a random-init Qwen2.5-1.5B shape
    python bench/sampler.py --compile --batch-sizes 8 32   # ours with the decode step torch.compile'd

Settings: temperature 1, no early stop (no stop tokens), `--new-tokens` per row, distinct prompts of
mixed length (chat-formatted Countdown-like questions). Both sides run in the same process, warm.
Also printed per decode step, for each side (a 17-token call less a 9-token call, over 8 steps): compute
ops (on a GPU about one kernel launch each), view ops and host syncs, counted by bench/op_counts.py.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from model import load_model, load_tokenizer  # noqa: E402
from bench._cli import Help  # noqa: E402
from bench.op_counts import per_step  # noqa: E402
import sampler  # noqa: E402
from sampler import generate  # noqa: E402

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, tie_word_embeddings=True)


def make_prompts(tokenizer, n):
    prompts = []
    for i in range(n):
        nums = [(7 * i + 3 * k) % 97 + 1 for k in range(3 + i % 2)]
        text = (f"Using the numbers {nums}, create an equation that equals {10 + (13 * i) % 90}. "
                + "Explain each step. " * (i % 4))
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(model, prompts, new_tokens, device):
    sync(device)
    t = time.perf_counter()
    g = generate(model, prompts, max_new_tokens=new_tokens, temperature=1.0,
                 generator=torch.Generator(device).manual_seed(0))
    sync(device)
    assert all(len(x) == new_tokens for x in g.tokens)
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def time_hf(model, prompts, new_tokens, device, pad_id):
    # Left padding with an explicit attention mask: what a user of HF generate would write.
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad_id)
    sync(device)
    assert out.shape[1] == width + new_tokens
    return len(prompts) * new_tokens / (time.perf_counter() - t)


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--model", default=None, help="HF model path or id; None: the embedded SmolLM2-135M")
    ap.add_argument("--random-init", action="store_true",
                    help="use a random-init model of Qwen2.5-1.5B's shape (for GPUs; needs no download)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batch sizes to time")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per setting (best is kept)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="model dtype; None: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--compile", action="store_true",
                    help="time ours with its decode step compiled by torch.compile(dynamic=True); the first call, "
                         "which compiles, is timed and printed apart (its rounding differs from eager's)")
    return ap


def main():
    args = parser().parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.random_init:
        from transformers import AutoModelForCausalLM, Qwen2Config
        tokenizer = load_tokenizer(args.model)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_15B), dtype=dtype).to(device).eval()
    else:
        model, tokenizer = load_model(args.model, device=device, dtype=dtype)
    # As rrr.py's sampler: q/k/v and gate/up back to back, which HF's modules compute with unchanged.
    sampler.fuse_projections(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = sum(p.numel() for p in model.parameters())
    print(f"device={device} dtype={next(model.parameters()).dtype} params={params / 1e6:.0f}M "
          f"threads={torch.get_num_threads()} new_tokens={args.new_tokens}")
    if args.compile:
        sampler._decode_step = torch.compile(sampler._decode_step, dynamic=True)
        t = time.perf_counter()
        time_ours(model, make_prompts(tokenizer, 8), 40, device)
        print(f"compiled the decode step: first call {time.perf_counter() - t:.0f} s")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6}   per decode step: compute ops, views, syncs "
          f"(ours | HF)")
    for bs in args.batch_sizes:
        prompts = make_prompts(tokenizer, bs)
        time_ours(model, prompts, 4, device)                # warm-up (with --compile: these shapes)
        time_hf(model, prompts[:1], 4, device, pad_id)
        ours = max(time_ours(model, prompts, args.new_tokens, device) for _ in range(args.repeats))
        hf = max(time_hf(model, prompts, args.new_tokens, device, pad_id) for _ in range(args.repeats))
        counts = "-"          # a dispatch mode around compiled code would make it recompile
        if not args.compile:
            counts = " | ".join(f"{c.compute:.0f}, {c.views:.0f}, {c.syncs:.2f}" for c in (
                per_step(lambda n: run(model, prompts, n, device)) for run in (time_ours, lambda *a: time_hf(*a, pad_id))))
        print(f"{bs:>5} {ours:>11.1f} {hf:>9.1f} {ours / hf:>5.2f}x   {counts}", flush=True)


if __name__ == "__main__":
    main()
