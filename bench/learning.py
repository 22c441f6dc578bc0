"""Does the training make a model better? RRR against its two controls, from one warm-started model.

Running time with the defaults: about 73 minutes on a 2-core AMD EPYC CPU (A in BENCHMARKS.md), fp32, with
the warm start already cached; building it first takes about 16 minutes more there.

    python bench/learning.py                      # countdown_easy, embedded SmolLM2-135M, 2-core CPU
    python bench/learning.py --steps 40 --out runs/learning-40

The embedded model scores about 0% on Countdown, so every group of reflections would get the same reward
and nothing could be learned. It first gets partial skill from a labelled warm start (warmstart.py:
supervised fine-tuning on solver-written answers to generated puzzles outside the test split; cached),
and everything below starts from that model. Then, one after the other, with one seed and one budget:
  1. rrr.py --method rrr                 (evaluates the warm-started model first: the vanilla row; builds
                                          the failure set)
  2. rrr.py --reflection generic         (the same failure set: --failure-set from run 1)
  3. rrr.py --method grpo                (the same failure set)
  and, with --arms, RRR's self-correction variants on the same failure set: feedback (--reflection-feedback:
  the verifier's feedback in the reflection prompt) and three-tries (--attempts 3);
and compare.py's table of the runs (accuracy after each try with 95% intervals, exact McNemar tests
against the vanilla evaluation they share) on --eval-size held-out puzzles. Written to --out: each run's
folder, comparison.md/.json (the table), learning.png (reward and zero-variance groups per step, and
first- and second-try accuracy per evaluation, per run) and learning.json beside it
(every evaluation's per-item results and every step's metrics, per method).

A run killed half-way is continued by the same command: finished runs are kept, an unfinished one is
resumed from its last checkpoint (rrr.py --resume).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._cli import Help  # noqa: E402
from compare import compare  # noqa: E402
from report import _figure, _save, _steps_axis  # noqa: E402
from runs import read_jsonl, write_json  # noqa: E402

METHODS = {"rrr": ["--method", "rrr"], "generic": ["--method", "rrr", "--reflection", "generic"],
           "grpo": ["--method", "grpo"],
           # the self-correction variants (optional arms, --arms): the verifier's feedback in the reflection
           # prompt (as RLEF, Gehring et al. 2024), and a third try (multi-attempt RL, Chung et al. 2025)
           "feedback": ["--method", "rrr", "--reflection-feedback"], "three-tries": ["--method", "rrr", "--attempts", "3"]}
LABELS = {"rrr": "RRR (model's reflection)", "generic": "generic reflection", "grpo": "GRPO on first attempts",
          "feedback": "RRR, feedback in the reflection prompt", "three-tries": "RRR, three tries"}
DEFAULT_ARMS = ("rrr", "generic", "grpo")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--out", type=Path, default=Path("runs/learning"), help="folder for the runs and the results")
    ap.add_argument("--task", default="countdown_easy", help="task (one with a solver for the warm start)")
    ap.add_argument("--warm-start", type=int, default=800, help="labelled puzzles the warm start fine-tunes on")
    ap.add_argument("--eval-size", type=int, default=300, help="held-out test puzzles every evaluation scores")
    ap.add_argument("--train-size", type=int, default=64, help="training queries the failure set is drawn from")
    ap.add_argument("--steps", type=int, default=10, help="training steps of each method")
    ap.add_argument("--batch-size", type=int, default=4, help="failures per step")
    ap.add_argument("--num-generations", type=int, default=8, help="G: reflections (or attempts) per failure")
    ap.add_argument("--learning-rate", type=float, default=5e-5, help="AdamW learning rate of every method")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps as well (0: before and after training only)")
    ap.add_argument("--seed", type=int, default=0, help="one seed for every run")
    ap.add_argument("--extra", default="",
                    help="more rrr.py flags for every run, as one string (default: %(default)r)")
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(METHODS),
                    help="the runs, in order (rrr first: the others reuse its failure set); feedback and "
                         "three-tries are RRR's self-correction variants")
    args = ap.parse_args(argv)
    if args.arms[0] != "rrr":
        ap.error("--arms must start with rrr, whose failure set the other arms reuse")
    return args


def rrr_args(args, method: str) -> list[str]:
    shared = ["--task", args.task, "--warm-start", str(args.warm_start), "--eval-size", str(args.eval_size),
              "--train-size", str(args.train_size), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--num-generations", str(args.num_generations), "--learning-rate", str(args.learning_rate),
              "--eval-every", str(args.eval_every), "--seed", str(args.seed), "--max-completion-length", "32",
              "--max-reflection-length", "64", "--failure-samples", "8", "--save-every", "5",
              "--save-total-limit", "1", "--log-episodes", "8"]
    if method != "rrr":
        shared += ["--failure-set", str(args.out / "rrr" / "failures.jsonl")]
    return shared + METHODS[method] + args.extra.split() + ["--out", str(args.out / method)]


def run_method(args, method: str):
    folder = args.out / method
    if (folder / "report.json").exists():
        print(f"{method}: finished before, kept ({folder})", flush=True)
        return
    cmd = [sys.executable, str(REPO / "rrr.py")] + rrr_args(args, method)
    if (folder / "config.json").exists():
        cmd.append("--resume")
    print(f"\n== {method}: {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    print(f"== {method}: {(time.time() - started) / 60:.1f} min", flush=True)


def learning_figure(path: Path, logs: dict):
    """Two panels, every run in each: (a) reward (solid) and zero-variance groups (dotted) per
    training step; (b) first-try (solid) and second-try (dashed) test accuracy per evaluation."""
    from matplotlib.ticker import PercentFormatter
    fig = _figure((12.0, 4.5))
    a, b = fig.subplots(1, 2)
    for i, (method, log) in enumerate(logs.items()):
        steps = [m["step"] for m in log["metrics"]]
        a.plot(steps, [m["reward"] for m in log["metrics"]], color=f"C{i}", marker="o", ms=3, label=f"{LABELS[method]}: reward")
        a.plot(steps, [m["zero_variance_groups"] for m in log["metrics"]], color=f"C{i}", ls=":",
               label=f"{LABELS[method]}: zero-variance groups")
        at = [e["step"] for e in log["evals"]]
        # Different markers, so that equal first- and second-try values both stay visible.
        b.plot(at, [e["first"] for e in log["evals"]], color=f"C{i}", marker="o", label=f"{LABELS[method]}: first try")
        b.plot(at, [e["second"] for e in log["evals"]], color=f"C{i}", marker="x", ms=9, ls="--",
               label=f"{LABELS[method]}: second try")
        _steps_axis(a, steps)
    a.set(title="(a) training reward per step", xlabel="training step", ylabel="fraction", ylim=(-0.03, 1.03))
    b.set(title="(b) held-out accuracy per evaluation", xlabel="training step", ylabel="accuracy")
    b.yaxis.set_major_formatter(PercentFormatter(1.0))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for method in args.arms:
        run_method(args, method)
    table, numbers = compare([args.out / m for m in args.arms])
    (args.out / "comparison.md").write_text(table + "\n")
    write_json(args.out / "comparison.json", numbers)
    logs = {m: dict(metrics=read_jsonl(args.out / m / "metrics.jsonl"), evals=read_jsonl(args.out / m / "evals.jsonl"),
                    answers=[dict(step=r["step"], id=r["id"], tries=r.get("tries", [r["first"], r["second"]]))
                             for r in read_jsonl(args.out / m / "eval_answers.jsonl")])
            for m in args.arms}
    write_json(args.out / "learning.json", dict(settings=vars(args) | dict(out=str(args.out)), runs=logs))
    learning_figure(args.out / "learning.png", logs)
    print(f"\n{table}\n\nwritten: {args.out / 'comparison.md'}, {args.out / 'learning.png'}, "
          f"{args.out / 'learning.json'} ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
