"""Where a GRPO step's time goes, part by part, without the profiler's distortions (on B the profiler's own
allocations bring back the page faults of the first updates: BENCHMARKS.md, "bf16 on B").

Running time with the defaults: about 1 minute (decode) and 5 minutes (update) on a 2-core Intel Xeon with
AMX (B in BENCHMARKS.md), bf16, loading included; --compile adds about 4 minutes of compiling there.

    python bench/step_parts.py --part decode                   # one decode step vs its products, batch 32 and 64
    python bench/step_parts.py --part decode --profile         # ... and the step's self CPU time per op kind
    python bench/step_parts.py --part update --dtype float32   # FSDP policy vs a plain copy, fp32
    python bench/step_parts.py --part update --compile         # ... and a plain copy whose layers are compiled

--part decode: sampler.py's decode step alone (`_decode_step`: 30 layers and the head, no sampling), on a
cache of random keys and values filled to --window - 40 slots, attending over --window slots; then the same
step's matrix products alone, multiplied the way `sampler._linear` does (W @ x^T, transposed) and as
`F.linear`: the floor the step is compared with. Medians of --repeats calls.

--part update: bench/grpo_step.py's step (4 prompts x 8 completions x 128 tokens, micro-batches of 8 rows,
`rrr.py --bf16` or `--no-bf16` as --dtype says) sampled once; then, alternating, the forward and backward
passes of its micro-batches through the policy (FSDP, fp32 master weights, each layer gathered once as
`policy.grpo_update` does) and through a plain copy of the model in the compute dtype (no FSDP), and the
reference model's passes through the FSDP reference and through the plain copy. The differences are what
FSDP costs with one process; what neither has is HF's layers and the head. --compile adds a third copy whose
decoder layers are each `torch.compile`d (dynamic shapes; its first passes, which compile, are timed apart):
what fusing the layers' elementwise work would save, which rrr.py does not do.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench._cli import Help  # noqa: E402


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--part", choices=["decode", "update"], required=True, help="which part to time")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64], help="decode: rows per step")
    ap.add_argument("--window", type=int, default=192, help="decode: key slots each step attends over")
    ap.add_argument("--repeats", type=int, default=30, help="decode: timed calls per setting (update: 4 each)")
    ap.add_argument("--compile", action="store_true",
                    help="update: also time a plain copy whose decoder layers are torch.compile'd (minutes to compile)")
    ap.add_argument("--profile", action="store_true",
                    help="decode: also print the step's self CPU time per op kind (torch.profiler, 10 steps)")
    return ap


def median_ms(f, repeats):
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def decode(args, dtype):
    import torch
    import torch.nn.functional as F

    import parallel as par
    import sampler
    from model import load_model

    model, _ = load_model(None, device="cpu", dtype=torch.float32)
    par.cast_parameters(model, dtype)
    sampler.fuse_projections(model).eval()
    w = sampler._prepare(model, args.window + 16, torch.zeros(1, dtype=dtype))
    matrices = [m for layer, lw in zip(sampler.decoder_body(model).layers, w.layers)
                for m in (lw["qkv"][0], layer.self_attn.o_proj.weight, lw["gate_up"][0], layer.mlp.down_proj.weight)]
    matrices.append(model.lm_head.weight)
    print(f"decode step, {dtype}, window {args.window}; median of {args.repeats} calls (ms)")
    print(f"{'batch':>5} {'step':>7} {'products (W @ x^T)^T':>21} {'products F.linear':>18}")
    with torch.inference_mode():
        for rows in args.batch_sizes:
            cache = sampler._new_cache(model, rows, args.window + 16, torch.device("cpu"), dtype)
            for t in cache.keys + cache.values:
                t.normal_()
            cache.lengths.fill_(args.window - 40)
            cache.last_token.random_(0, 1000)
            step = median_ms(lambda: sampler._decode_step(model, w, cache, args.window), args.repeats)
            xs = {n: torch.randn(rows, n, dtype=dtype) for n in {m.shape[1] for m in matrices}}
            transposed = median_ms(lambda: [(m @ xs[m.shape[1]].t()).t() for m in matrices], args.repeats)
            linear = median_ms(lambda: [F.linear(xs[m.shape[1]], m) for m in matrices], args.repeats)
            print(f"{rows:>5} {step:>7.1f} {transposed:>21.1f} {linear:>18.1f}")
            if args.profile:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(10):
                        sampler._decode_step(model, w, cache, args.window)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40))


def update(args, dtype):
    import torch

    import parallel as par
    import policy
    import rrr
    from bench import grpo_step
    from grpo import packed_logprobs
    from model import load_model, right_pad

    # bench/grpo_step.py's step with its defaults, in the dtype asked for
    step_args = grpo_step.parser().parse_args(["--bf16"] if dtype == torch.bfloat16 else [])
    cfg, d, pol, run, failures = grpo_step.setup(step_args)
    with rrr.sampling(pol):
        episodes = rrr.rollout(run, failures, 0)
    trained = [e.ids[e.span[0]:e.span[1]] for e in episodes]
    batches = policy.micro_batches(cfg, d, pol, episodes, trained, [1.0] * len(episodes))
    reference = policy.reference_model(pol)

    def plain_copy():
        """The model without FSDP, in the compute dtype, with the policy's attention."""
        model, _ = load_model(None, device="cpu", dtype=torch.float32)
        par.cast_parameters(model, dtype)
        model.set_attn_implementation(pol.model.config._attn_implementation)
        return model.train()

    def gathered(model):        # the FSDP models' layers gathered once for the passes, as policy.py does
        return par.gathered_across_micro_batches(model if model in (pol.model, reference) else None, d)

    def train_passes(model):
        with gathered(model):
            for mb in batches:
                (right_pad(packed_logprobs(model, mb.groups)) * mb.mask).sum().backward()
        model.zero_grad(set_to_none=True)

    def reference_passes(model):
        with torch.no_grad(), gathered(model):
            for mb in batches:
                packed_logprobs(model, mb.groups)

    plain = plain_copy()
    sides = [("forward + backward, FSDP policy", train_passes, pol.model),
             ("forward + backward, plain copy", train_passes, plain),
             ("reference passes, FSDP reference", reference_passes, reference),
             ("reference passes, plain copy", reference_passes, plain)]
    if args.compile:
        import torch._dynamo
        # Each layer is its own module, compiled on its own, with and without grad: raise the recompile limits.
        torch._dynamo.config.recompile_limit = 256
        torch._dynamo.config.accumulated_recompile_limit = 4096
        compiled = plain_copy()
        for layer in compiled.model.layers:
            layer.compile(dynamic=True)
        t = time.perf_counter()
        train_passes(compiled)
        reference_passes(compiled)
        print(f"compiling the layers (the first passes): {time.perf_counter() - t:.0f} s")
        sides[2:2] = [("forward + backward, compiled copy", train_passes, compiled)]
        sides.append(("reference passes, compiled copy", reference_passes, compiled))
    times = {name: [] for name, _, _ in sides}
    train_passes(pol.model)                     # the first passes grow the heap (page faults): untimed
    train_passes(plain)
    for _ in range(4):
        for name, f, model in sides:
            t = time.perf_counter()
            f(model)
            times[name].append(time.perf_counter() - t)
    print(f"the update's {len(batches)} micro-batches, {dtype}; seconds, 4 alternating repeats each")
    for name, ts in times.items():
        print(f"{name:>34}: median {statistics.median(ts):.2f} ({', '.join(f'{t:.2f}' for t in ts)})")
    par.close_distributed()


def main():
    args = parser().parse_args()
    import torch
    dtype = getattr(torch, args.dtype)
    decode(args, dtype) if args.part == "decode" else update(args, dtype)


if __name__ == "__main__":
    main()
