"""The GPU suite in one command, for a machine with 1 or more GPUs: tests, sampler speed, memory per phase.

Running time with the defaults (bf16): not known yet; no GPU has run this script (BENCHMARKS.md, "On a GPU").

    python bench/gpu.py                              # all of it; the report also goes to bench/gpu-results.json
    python bench/gpu.py --skip-tests --shapes 1.5b --batches 64
    python bench/gpu.py --dry-run --skip-tests       # the same code on the CPU: tiny shapes, fp32, no GPU

1. `python -m pytest -q tests/test_cuda.py` in a subprocess: passed or failed.
2. Sampler throughput: `sampler.generate` against HF `model.generate` on random-init bf16 models of the
   Qwen2.5-1.5B-Instruct and 7B-Instruct shapes (from their configs: no download); temperature 1, no
   stop tokens, distinct random prompts of 100-200 tokens (left-padded with a mask for HF). Generated
   tokens/s over the whole call, best of --repeats, warm, both sides in this process. Then, per decode
   step (a call of --new-tokens less a call of 1, over the steps between; captures included): ours with
   CUDA graphs and without, HF; the memory-bandwidth bound (weights + the KV windows read per step over the card's
   read bandwidth, measured by a large sum); kernel launches per step from the profiler (a graph
   replay is one) and host syncs per step (bench/op_counts.py).
3. Memory per phase on one process (N = 1, no torchrun), each shape in a subprocess of its own, against
   the formula printed with the results; phases that the formula says would not fit are skipped.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._cli import Help  # noqa: E402

ROPE = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
SHAPES = {"1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **ROPE),
          "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, **ROPE)}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
GB = 1e9


def config(shape, dry, vocab=None):
    from transformers import Qwen2Config
    return Qwen2Config(**{**SHAPES[shape], **(TINY if dry else {}), **({"vocab_size": vocab} if vocab else {})})


def timed(dev, work):
    """(work(), seconds), with the GPU's queue drained on both sides."""
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = work()
    if dev == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - t


def run_tests(dry) -> dict:
    # Under --dry-run the tests run on the CPU too (RRR_TEST_CUDA_ON_CPU=1), else they would all skip.
    env = dict(os.environ, **({"RRR_TEST_CUDA_ON_CPU": "1"} if dry else {}))
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return dict(passed=done.returncode == 0, summary=lines[-1] if lines else done.stderr[-300:],
                seconds=time.perf_counter() - t, output_tail=(done.stdout + done.stderr)[-4000:])


def prompts_for(batch, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(100, 201, (batch,), generator=g)]


def time_ours(model, prompts, new, dev, graphs=True):
    from sampler import generate
    g, seconds = timed(dev, lambda: generate(model, prompts, max_new_tokens=new, temperature=1.0, cuda_graphs=graphs,
                                             generator=torch.Generator(dev).manual_seed(0)))
    assert all(len(x) == new for x in g.tokens)
    return len(prompts) * new / seconds


def time_hf(model, prompts, new, dev):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):          # left padding, as a user of HF generate would
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(dev), mask.to(dev)
    with torch.inference_mode():
        out, seconds = timed(dev, lambda: model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                                         top_k=0, top_p=1.0, max_new_tokens=new, eos_token_id=None,
                                                         pad_token_id=0))
    assert out.shape[1] == width + new
    return len(prompts) * new / seconds


def throughput(shape, args, dev, dtype) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from sampler import fuse_projections
    torch.manual_seed(0)
    cfg = config(shape, args.dry_run)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    fuse_projections(model)          # as rrr.py's sampler; HF computes exactly the same with the views
    rows = []
    for batch in args.batches:
        prompts = prompts_for(batch, cfg.vocab_size, seed=batch)
        time_ours(model, prompts[:2], 4, dev)                     # warm-up
        time_hf(model, prompts[:2], 4, dev)
        ours = max(time_ours(model, prompts, args.new_tokens, dev) for _ in range(args.repeats))
        hf = max(time_hf(model, prompts, args.new_tokens, dev) for _ in range(args.repeats))
        row = dict(shape=shape, batch=batch, new_tokens=args.new_tokens, ours_tok_s=ours, hf_tok_s=hf, ratio=ours / hf)
        print(f"{shape:>5} {batch:>6} {ours:>11.0f} {hf:>9.0f} {ours / hf:>6.2f}x", flush=True)
        row.update(per_step(model, prompts, args, dev))
        rows.append(row)
        print(f"      per decode step: ours {row['ours_ms']:.2f} ms ({row['ours_launches']:.0f} launches, "
              f"{row['ours_syncs']:.2f} syncs), eager {row['eager_ms']:.2f} ms ({row['eager_launches']:.0f}, "
              f"{row['eager_syncs']:.2f}), HF {row['hf_ms']:.2f} ms ({row['hf_launches']:.0f}, {row['hf_syncs']:.2f}); "
              f"bandwidth bound {row['bound_ms']:.2f} ms ({row['step_bytes'] / GB:.2f} GB at {row['read_gb_s']:.0f} GB/s): "
              f"ours at {row['ours_ms'] / row['bound_ms']:.2f}x of it", flush=True)
    return rows


def read_bandwidth(dev) -> float:
    """Bytes/s a large reduction reads."""
    x = torch.ones(2**30 if dev == "cuda" else 2**26, dtype=torch.bfloat16, device=dev)
    x.sum()
    best = min(timed(dev, lambda: x.sum())[1] for _ in range(5))
    return x.numel() * x.element_size() / best


def per_step(model, prompts, args, dev) -> dict:
    """Milliseconds, kernel launches and host syncs per decode step, and the bandwidth bound."""
    from bench.op_counts import per_step as ops_per_step
    from sampler import _round_up, window_block_for

    new = args.new_tokens
    if dev == "cuda":
        torch.cuda.synchronize()

    def launches(work):
        if dev != "cuda":
            return float("nan")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            work()
            torch.cuda.synchronize()
        names = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
        return sum(e.count for e in prof.key_averages() if e.key in names)

    out = {}
    sides = dict(ours=lambda n: time_ours(model, prompts, n, dev), eager=lambda n: time_ours(model, prompts, n, dev, False),
                 hf=lambda n: time_hf(model, prompts, n, dev))
    for name, run in sides.items():
        one = min(len(prompts) / run(1) for _ in range(args.repeats))          # seconds of a 1-token call
        full = min(len(prompts) * new / run(new) for _ in range(args.repeats))
        out[f"{name}_ms"] = (full - one) / (new - 1) * 1e3
        # As ops_per_step: prompts of at most 200 tokens stay in the first 256-slot window, so the 8
        # steps between a 9-token and a 17-token call are replays only.
        out[f"{name}_syncs"] = ops_per_step(run).syncs
        out[f"{name}_launches"] = (launches(lambda: run(17)) - launches(lambda: run(9))) / 8
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_heads, head_dim = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    block, longest = window_block_for(torch.device(dev)), max(len(p) for p in prompts)
    windows = [_round_up(longest + s + 1, block) for s in range(new - 1)]
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize * len(prompts) * sum(windows) / len(windows)
    out["step_bytes"] = weights + kv
    out["read_gb_s"] = read_bandwidth(dev) / GB
    out["bound_ms"] = out["step_bytes"] / (out["read_gb_s"] * GB) * 1e3
    return out


# --- memory per phase (run in a subprocess per shape: --memory-shape) --------------------------------

def live_bytes() -> int:
    """CPU (dry run) stand-in for allocated bytes: every live tensor storage, counted once. There is no
    peak on the CPU: 'peaks' there are these bytes at the moment of reading."""
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                t = getattr(obj, "_local_tensor", obj)
                if t.device.type != "meta":
                    seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        except (RuntimeError, ReferenceError, NotImplementedError):
            pass
    return sum(seen.values())


def allocated(dev):
    return torch.cuda.memory_allocated() if dev == "cuda" else live_bytes()


def peak(dev, reset=False):
    if dev == "cuda" and reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() if dev == "cuda" else live_bytes()


def memory(shape, args, dev) -> dict:
    from transformers import AutoModelForCausalLM

    import parallel as par
    import rrr
    from model import load_tokenizer
    from sampler import _round_up, window_block_for
    from runs import parse_config
    tok = load_tokenizer(None)
    cfg_m = config(shape, args.dry_run, vocab=len(tok))   # the tokenizer's vocabulary: 49152
    folder = Path(tempfile.mkdtemp(prefix=f"gpu-bench-{shape}-"))
    torch.manual_seed(0)
    with torch.device(dev):           # initialised on the GPU (fast), saved in bf16 (half the disk)
        model = AutoModelForCausalLM.from_config(cfg_m, dtype=torch.float32 if args.dry_run else torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    total = torch.cuda.get_device_properties(0).total_memory if dev == "cuda" else None
    fits = lambda need: total is None or need < 0.92 * total     # noqa: E731 (allocator slack, CUDA context)
    cfg = parse_config(rrr.Config, [f"--model={folder}", "--bf16" if dev == "cuda" else "--no-bf16", "--beta=0.001",
                                    f"--device={dev}", "--num-generations=2", "--micro-batch-size=2"])
    N, L, kv, hd = 1, cfg_m.num_hidden_layers, cfg_m.num_key_value_heads, cfg_m.hidden_size // cfg_m.num_attention_heads
    H = cfg_m.vocab_size * cfg_m.hidden_size
    low = 2 if cfg.bf16 else 4                   # bytes per value in the compute dtype
    d = par.init_distributed(dev)
    out = dict(shape=shape, vocab=cfg_m.vocab_size, world=N, total_memory=total)
    try:
        base = allocated(dev)
        rrr.resolve_model_flags(cfg)
        pol = rrr.load_policy(cfg, d)
        P = sum(p.numel() for p in pol.sampler.parameters())
        layer = sum(p.numel() for p in par.decoder_layers(pol.sampler)[0].parameters())
        R = P - L * layer                         # root unit: embeddings, final norm, head
        rest = (4 + low) / N * P                  # fp32 master + reference in the compute dtype
        f = dict(load=rest, sampling_weights=rest + low * P)
        out.update(params=P, root_params=R, head_params=H, layer_params=layer, checkpointing=cfg.gradient_checkpointing)
        m = dict(load=allocated(dev) - base)
        rows, new = args.batches[0], args.new_tokens
        prompts = prompts_for(rows, cfg_m.vocab_size)
        block = window_block_for(torch.device(dev))       # the sampler rounds its cache up to this
        capacity = _round_up(max(len(p) for p in prompts) + new, block)
        f["sampling_with_cache"] = f["sampling_weights"] + 2 * L * kv * hd * low * rows * capacity
        pol.stops = []                            # every row runs to --new-tokens
        with rrr.sampling(pol):
            m["sampling_weights"] = allocated(dev) - base
            peak(dev, reset=True)
            gen = rrr.sample(pol, prompts, cfg, max_new_tokens=new, temperature=1.0, keep_cache=True,
                             gen=torch.Generator(d.device).manual_seed(0))
            m["sampling_with_cache"], m["sampling_peak"] = allocated(dev) - base, peak(dev) - base
            del gen
        m["after_sampling"] = allocated(dev) - base
        f["after_sampling"] = rest
        # The update: two micro-batches of one group (a 200-token prompt, 2 x 64 trained tokens).
        f["update_backward_peak"] = rest + 4 / N * P + low * R + 2 * low * layer
        f["optimizer_step_peak"] = rest + (4 + 8) / N * P
        f["after_step"] = rest + 8 / N * P
        # torch's multi-tensor AdamW also makes sqrt(v) for every parameter at once: +4/N on top.
        step_need = f["optimizer_step_peak"] + 4 / N * P
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(3, cfg_m.vocab_size, (200,), generator=g).tolist()
        episodes = [rrr.Episode("x", prompt + torch.randint(3, cfg_m.vocab_size, (64,), generator=g).tolist(),
                                (200, 264), float(r % 2), False, 64, advantage=float(r % 2) - 0.5) for r in range(4)]
        if not fits(f["update_backward_peak"]):
            m.update(update_backward_peak="skipped", optimizer_step_peak="skipped", after_step="skipped")
        else:
            real_step = pol.optimizer.step

            def measured_step(*a, **k):
                m["update_backward_peak"] = peak(dev) - base
                if not fits(step_need):       # the gradients are dropped unapplied by grpo_update's zero_grad
                    m["optimizer_step_peak"] = "skipped"
                    return None
                peak(dev, reset=True)
                result = real_step(*a, **k)
                m["optimizer_step_peak"] = peak(dev) - base
                return result

            pol.optimizer.step = measured_step
            peak(dev, reset=True)
            rrr.grpo_update(cfg, d, pol, episodes, rrr.trained_length_limit(cfg))
            m["after_step"] = allocated(dev) - base if m["optimizer_step_peak"] != "skipped" else "skipped"
        out["phases"] = {k: dict(measured=m[k], formula=f[k]) for k in f}
        out["sampling_peak"] = m["sampling_peak"]
        out["step_need_with_foreach_temporary"] = step_need
    finally:
        par.close_distributed()
        shutil.rmtree(folder, ignore_errors=True)
    return out


def print_memory(r):
    P = r["params"]
    print(f"\n{r['shape']}: P = {P / 1e9:.3f}B parameters (vocabulary {r['vocab']}: the SmolLM2 tokenizer's, not "
          f"Qwen's), R = {r['root_params'] / 1e6:.0f}M root, H = {r['head_params'] / 1e6:.0f}M head, one layer "
          f"{r['layer_params'] / 1e6:.0f}M; N = 1; gradient checkpointing {r['checkpointing']}; full depth, phases "
          f"that would not fit skipped")
    print(f"{'phase':>22} {'measured GB':>12} {'formula GB':>11} {'meas B/P':>9} {'form B/P':>9}")
    def cell(x, scale, width):          # "skipped" and "-" as they are
        return f"{x / scale:>{width}.2f}" if isinstance(x, (int, float)) else f"{x:>{width}}"

    for k, v in [*r["phases"].items(), ("sampling_peak", dict(measured=r["sampling_peak"], formula="-"))]:
        m, f = v["measured"], v["formula"]
        print(f"{k:>22} {cell(m, GB, 12)} {cell(f, GB, 11)} {cell(m, P, 9)} {cell(f, P, 9)}")
    print("(sampling_peak: also logits and activations, which the formula leaves out)")


LEGEND = """
memory per phase, one process (N = 1), --bf16 --beta 0.001, bytes per parameter per rank (P parameters):
  load, after_sampling   4/N fp32 master + 2/N bf16 reference      sampling_weights  + 2 (full bf16 sampler)
  sampling_with_cache    + KV cache: 2 x layers x kv_heads x head_dim x 2 bytes per token held (rows x capacity)
  update_backward_peak   + 4/N fp32 gradients + 2R (root gathered, bf16) + 2 x 2 x one layer
                         (gathered + prefetched); activations left out
  optimizer_step_peak    + 4/N gradients + 8/N AdamW moments; after_step 4/N + 2/N + 8/N
Peaks: torch.cuda.max_memory_allocated after reset_peak_memory_stats, less what was allocated before loading.
Skipped: the formula says it would not fit this GPU (for the step, with the 4/N temporary of torch's AdamW)."""


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--out", default=None, help="JSON report; None: bench/gpu-results.json, or with "
                    "--dry-run a file in the temporary folder, so that a dry run never replaces real figures")
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/test_cuda.py first")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (2 layers, hidden 64), fp32: exercises "
                    "the script without a GPU; its figures mean nothing")
    ap.add_argument("--shapes", default="1.5b,7b", help="comma-separated model shapes among 1.5b,7b")
    ap.add_argument("--batches", default=None, help="comma-separated sampler batch sizes; None: 64,256 (2,4 "
                    "with --dry-run); the first is also the sampling batch of the memory part")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="tokens generated per row; None: 256 (8 with --dry-run)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per setting (best is kept)")
    ap.add_argument("--memory-shape", help=argparse.SUPPRESS)     # internal: one shape's memory part
    return ap


def main():
    ap = parser()
    args = ap.parse_args()
    args.batches = [int(b) for b in (args.batches or ("2,4" if args.dry_run else "64,256")).split(",")]
    args.new_tokens = args.new_tokens or (8 if args.dry_run else 256)
    shapes = args.shapes.split(",")
    if any(s not in SHAPES for s in shapes):
        ap.error(f"--shapes: choose among {','.join(SHAPES)}")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device; --dry-run runs the same code on the CPU")
    dev, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    if args.memory_shape:
        print(json.dumps(memory(args.memory_shape, args, dev)))
        return
    out = Path(args.out or (Path(tempfile.gettempdir()) / "gpu-results-dry-run.json" if args.dry_run
                            else REPO / "bench" / "gpu-results.json"))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if dev == "cuda" else ["cpu"]
    report = dict(dry_run=args.dry_run, device=gpus, torch=torch.__version__,
                  batches=args.batches, new_tokens=args.new_tokens, shapes=shapes)
    print(f"device: {report['device']}, torch {torch.__version__}{', DRY RUN (CPU, tiny shapes, fp32)' if args.dry_run else ''}")
    if not args.skip_tests:
        report["tests"] = run_tests(args.dry_run)
        print(f"tests/test_cuda.py: {'PASSED' if report['tests']['passed'] else 'FAILED'} "
              f"({report['tests']['summary']}, {report['tests']['seconds']:.0f} s)", flush=True)
    print(f"\nsampler throughput, {args.new_tokens} new tokens per row, temperature 1, prompts of 100-200 tokens, "
          f"{dtype}, best of {args.repeats}")
    print(f"{'shape':>5} {'batch':>6} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>7}")
    report["throughput"] = []
    for s in shapes:
        report["throughput"] += throughput(s, args, dev, dtype)     # its model is freed on return
        if dev == "cuda":
            torch.cuda.empty_cache()
    report["memory"] = {}
    print(LEGEND if not args.dry_run else "\nmemory per phase (dry run: live CPU tensor bytes at each reading, no peaks; "
          "no CUDA graphs)")
    for s in shapes:
        cmd = [sys.executable, __file__, "--memory-shape", s, "--batches", ",".join(map(str, args.batches)),
               "--new-tokens", str(args.new_tokens)] + (["--dry-run"] if args.dry_run else [])
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            report["memory"][s] = dict(error=done.stderr[-3000:])
            print(f"\n{s}: memory part FAILED:\n{done.stderr[-1500:]}")
            continue
        report["memory"][s] = json.loads(done.stdout.strip().splitlines()[-1])
        print_memory(report["memory"][s])
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nreport: {out}")


if __name__ == "__main__":
    main()
