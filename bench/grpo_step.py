"""One GRPO training step (sampling + update) of `rrr.py --method grpo` against TRL's GRPOTrainer.

Running time with the defaults: about 9-11 minutes on a 2-core Intel Xeon with AMX (B in BENCHMARKS.md)
and 12-14 on a 2-core AMD EPYC (A), fp32 on both sides: an estimate from the step times in BENCHMARKS.md
(4 steps a side: two warm-up, 2 timed), loading not counted.

    pip install trl==1.16.0          # the baseline only; not a dependency of the project
    python bench/grpo_step.py        # embedded SmolLM2-135M, fp32, CPU: 4 prompts x 8 generations x 128 tokens
    python bench/grpo_step.py --bf16 # both sides in bf16 compute (ours: fp32 master weights, as rrr.py --bf16)
    python bench/grpo_step.py --use-peft --skip-trl   # ours with LoRA (rrr.py --use-peft) against ours in full

Same model, prompts (Countdown), group size, completion length (no early stop on either side: every
completion is --new-tokens long), beta, learning rate and loss type. Each side runs in its own process
(so that peak memory is its own), --warmup untimed steps then --steps timed steps; both are run by this one
command. Tokens/s counts the generated tokens of a step over the whole step (sampling + update).
Peak memory is the process's peak resident set size. --use-peft adds a third side, ours with LoRA adapters
on every linear layer (rrr.py --use-peft, rank --lora-r, same dtype): no reference copy, an optimizer over
the adapters only, sampling from merged weights.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench._cli import Help  # noqa: E402


def setup(args, peft=False):
    """Ours for the benchmark's step: (cfg, d, pol, run, failures), as rrr.py --method grpo builds them,
    with no stop token (every completion --new-tokens long). bench/step_parts.py times parts of this step."""
    import parallel as par
    import rrr
    from data import load_splits
    from failures import Failure
    from runs import parse_config

    lora = ["--use-peft", "--lora-r", str(args.lora_r)] if peft else []
    cfg = parse_config(rrr.Config, lora + ["--method", "grpo", "--num-generations", str(args.generations),
                                    "--max-completion-length", str(args.new_tokens), "--beta", str(args.beta),
                                    "--learning-rate", "1e-6", "--batch-size", str(args.prompts),
                                    "--micro-batch-size", str(args.micro_batch), "--device", "cpu",
                                    "--bf16" if args.bf16 else "--no-bf16"])
    d = par.init_distributed("cpu")
    task, train, _ = load_splits("countdown", None, args.prompts, 1, 0)
    pol = rrr.load_policy(cfg, d)
    pol.stops = []                                   # no early stop: every completion is full length
    failures = [Failure(ex.id, [], None, "", "", 1) for ex in train]
    run = rrr.Run(cfg, d, pol, task, [], {ex.id: ex for ex in train}, None)
    return cfg, d, pol, run, failures


def ours(args, peft=False):
    import parallel as par
    import rrr

    cfg, d, pol, run, failures = setup(args, peft)
    times = []          # (step, sampling, update) seconds
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        with profiled(args.profile and step >= args.warmup, "sampling"), rrr.sampling(pol):
            episodes = rrr.rollout(run, failures, step)
        sampled = time.perf_counter()
        with profiled(args.profile and step >= args.warmup, "update"):
            rrr.grpo_update(cfg, d, pol, episodes, rrr.trained_length_limit(cfg))
        end = time.perf_counter()
        times.append((end - t, sampled - t, end - sampled))
        assert sum(e.sampled for e in episodes) == args.prompts * args.generations * args.new_tokens
    par.close_distributed()
    return min(times[args.warmup:])


@contextmanager
def profiled(on, phase):
    """With --profile: the phase's self CPU time per op kind (torch.profiler), printed to stderr."""
    if not on:
        yield
        return
    from torch.profiler import ProfilerActivity, profile
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        yield
    seconds = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40)
    print(f"== {phase}: {seconds:.1f} s under the profiler\n{table}", file=sys.stderr)


def trl(args):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from data import load_splits
    from model import load_model

    task, train, _ = load_splits("countdown", None, args.prompts, 1, 0)
    model, tokenizer = load_model(None, device="cpu")
    model.train()
    references = {ex.messages[-1]["content"]: ex for ex in train}

    def reward(prompts, completions, **_):
        exs = [references[p[-1]["content"]] for p in prompts]
        return [float(v.ok) for v in task.check_batch([c[-1]["content"] for c in completions], exs)]

    times, last = [], [None]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            last[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - last[0])

    config = GRPOConfig(output_dir=os.path.join(args.tmp, "trl"), use_cpu=True, bf16=args.bf16,
                        per_device_train_batch_size=args.prompts * args.generations, num_generations=args.generations,
                        max_completion_length=args.new_tokens, max_steps=args.warmup + args.steps, beta=args.beta,
                        learning_rate=1e-6, loss_type="dapo", temperature=1.0, report_to=[], logging_steps=1000,
                        save_strategy="no", gradient_accumulation_steps=1,
                        generation_kwargs=dict(min_new_tokens=args.new_tokens))
    data = Dataset.from_list([{"prompt": ex.messages} for ex in train] * (args.warmup + args.steps) * args.generations)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return min(times[args.warmup:])


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (the GRPO group)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per completion (no early stop)")
    ap.add_argument("--beta", type=float, default=0.001,
                    help="KL coefficient (> 0 keeps a reference model on both sides)")
    ap.add_argument("--micro-batch", type=int, default=8, help="our rows per forward/backward pass")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up steps (the best is kept)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first: the first two steps of a process grow the allocator to its peak (on B, "
                    "0.3-0.9 million page faults in each of them, several seconds of an update); later steps do not")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16 compute on both sides (TRL's --bf16; ours: rrr.py --bf16); fp32 without it")
    ap.add_argument("--use-peft", action="store_true", help="also time ours with LoRA adapters (rrr.py --use-peft)")
    ap.add_argument("--lora-r", type=int, default=16, help="LoRA rank with --use-peft (rrr.py's default)")
    ap.add_argument("--skip-trl", action="store_true", help="leave out TRL's side (e.g. with --use-peft, to compare "
                    "ours with and without adapters where TRL is not installed)")
    ap.add_argument("--profile", action="store_true",
                    help="ours: print each timed step's self CPU time per op kind (torch.profiler), for sampling "
                    "and the update apart; the profiler slows the step, so its times are not the table's")
    ap.add_argument("--side", choices=["ours", "ours-peft", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/grpo_step_bench", help="scratch folder for TRL's output_dir")
    return ap


def main():
    args = parser().parse_args()
    if args.side:
        best = {"ours": ours, "ours-peft": lambda a: ours(a, peft=True), "trl": trl}[args.side](args)
        seconds, sampling, update = best if isinstance(best, tuple) else (best, None, None)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(dict(seconds=seconds, sampling=sampling, update=update, peak_mb=peak)))
        return
    tokens = args.prompts * args.generations * args.new_tokens
    print(f"{args.prompts} prompts x {args.generations} generations x {args.new_tokens} tokens = {tokens} tokens/step, "
          f"beta {args.beta}, {'bf16' if args.bf16 else 'fp32'} CPU, {os.cpu_count()} cores")
    results = {}
    sides = ["ours"] + (["ours-peft"] if args.use_peft else []) + ([] if args.skip_trl else ["trl"])
    for side in sides:
        done = subprocess.run([sys.executable, __file__, "--side", side] + sys.argv[1:], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
        if args.profile:
            print("\n".join(line for line in done.stderr.splitlines() if "it/s]" not in line))
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'':>9} {'step s':>8} {'tokens/s':>9} {'peak MB':>8}  (ours: the best step's sampling + update s)")
    for side, r in results.items():
        parts = f"  {r['sampling']:.1f} + {r['update']:.1f}" if r.get("sampling") is not None else ""
        print(f"{side:>9} {r['seconds']:>8.1f} {tokens / r['seconds']:>9.1f} {r['peak_mb']:>8.0f}{parts}")
    o = results["ours"]
    for side in ("trl", "ours-peft"):
        if side in results:
            a, b = (o, results[side]) if side == "trl" else (results[side], o)
            label = "ours / TRL" if side == "trl" else "ours with LoRA / ours in full"
            print(f"throughput ratio ({label}): {b['seconds'] / a['seconds']:.2f}x; "
                  f"peak memory ratio: {a['peak_mb'] / b['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
