"""Does the training make a model better? Settings chosen on a dev split, then RRR and its controls on the
held-out test split over seeds, from one labelled warm start of the embedded SmolLM2-135M (countdown_easy).

    python bench/learning.py --stage sweep                       # every configuration of SWEEP, in order
    python bench/learning.py --stage sweep --configs grpo-lora-1e-4-dyn
    python bench/learning.py --stage final --seeds 0             # the chosen settings (FINAL), 4 arms
    python bench/learning.py --stage final --seeds 0 1 --arms rrr grpo   # a second seed of RRR and GRPO
    python bench/learning.py --stage rerest --seeds 0            # Re-ReST from FINAL's warm start

Running time (2-core CPU, fp32 fixed), measured on B (Intel Xeon with AMX): the answers-only warm start
builds in 8 minutes, the one with labelled reflections in 56 (both cached); in the sweep a plain-GRPO step
with dynamic sampling takes about 60 s and an RRR step about 130 s (up to 4 draws of 8 failures x 8), a dev
evaluation 3-5 minutes: about an hour for a GRPO configuration of 40 steps, 1.9 hours for an RRR one.
BENCHMARKS.md gives each run's cost. A seed of the final stage runs four arms of 20 steps, each evaluated on
the 500 test puzzles before and after training (7.5 minutes an evaluation): about 3 hours 20 minutes
(RRR and its feedback variant about 1 hour each, the generic control and plain GRPO less; BENCHMARKS.md
gives what each took).

The embedded model scores about 0% on Countdown, so every group would get the same reward and nothing could
be learned. It first gets partial skill from a labelled warm start (warmstart.py: supervised fine-tuning on
solver-written answers to generated puzzles outside the test and dev splits; cached; every run records it).

--stage sweep: each configuration of SWEEP (plain GRPO first: does RL raise the first try here at all? then
  RRR) is one rrr.py run on the dev split (--eval-split dev: countdown_easy's 300 dev puzzles, apart from
  train and test), evaluated every --eval-every steps. The runs of one warm start share one failure set.
  Written to --out/sweep/: each run's folder, sweep.md (per configuration: settings, cost, dev accuracy at
  each evaluation, the change from the warm start with an exact McNemar test) and sweep.png (every run's
  curves); --results/sweep.json: every evaluation's per-item results, per configuration.
--stage final: FINAL's settings (chosen from the sweep; the test split is not scored before), for each
  --seeds seed: RRR (it builds the seed's failure set), RRR with --reflection-feedback, the generic-
  reflection control and plain GRPO on the same failures, scored on the whole test split (500 puzzles).
  Written to --out/final/seed-<s>/: the runs, comparison.md (compare.py's table); --out/final/: pooled.md
  (every seed's items together) and learning.png; --results/final.json (every evaluation's per-item
  results and every step's metrics, per seed and arm) and, for LoRA settings, --results/adapters/.

--stage rerest: rerest.py (its defaults: k = 4 samples per puzzle, LoRA r8 on q_proj and v_proj, 3 epochs)
  from FINAL's warm start on the same 512 training and 500 test puzzles, answers of at most 32 tokens as in
  RRR, per --seeds seed: the base, self-training and Re-ReST rows (--dpo: DPO too). Written to
  --out/rerest/seed-<s>/ (rerest.py's report and caches); --results/rerest.json: each row's per-puzzle
  results per seed and Re-ReST against self-training on the same puzzles (exact McNemar).

A run killed half-way is continued by the same command: finished runs are kept, an unfinished one is
resumed from its last checkpoint (rrr.py --resume). The dtype is fixed (fp32 unless --bf16): machines differ
(CPUs with AMX default to bf16), and every table names the machine and dtype it was measured with.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._cli import Help  # noqa: E402
from compare import compare  # noqa: E402
from report import (_figure, _save, _steps_axis, markdown_table, mcnemar_exact, paired_change, pct,  # noqa: E402
                    tries_of, vanilla_and_last)
from runs import read_jsonl, write_json  # noqa: E402

# Every run: countdown_easy, G = 8, 8 failures per step, answers of at most 32 tokens, reflections of 64.
COMMON = ["--task", "countdown_easy", "--batch-size", "8", "--num-generations", "8", "--failure-samples", "8",
          "--train-size", "512", "--max-completion-length", "32", "--max-reflection-length", "64",
          "--save-every", "5", "--save-total-limit", "1", "--log-episodes", "8"]
LORA = ["--use-peft", "--lora-r", "16", "--lora-alpha", "32"]      # every linear layer (rrr.py's default)
DYNAMIC = ["--dynamic-sampling", "--max-num-gen-batches", "4"]

# The warm starts (warmstart.py, cached): 800 solver-written answers; the same with the reflection turn
# labelled too (a reflection built from the verifier's verdict on a wrong answer, then the solver's retry).
WARM = {"answers-800": ["--warm-start", "800"],
        "reflections-800": ["--warm-start", "800", "--warm-start-reflections"]}

# The sweep's grid, in the order it runs: name -> (warm start, steps, rrr.py flags). Public recipes bound it:
# full fine-tuning near 1e-6 to 1e-5 (TRL's default 1e-6), LoRA about 10x that (LoRA Without Regret, Thinking
# Machines 2025: rank 16-32 on every linear layer). A configuration added here runs next.
SWEEP = {
    "grpo-lora-1e-4-dyn": ("answers-800", 40, ["--method", "grpo", *LORA, "--learning-rate", "1e-4", *DYNAMIC]),
    "rrr-lora-3e-5-dyn-reflws": ("reflections-800", 40, ["--method", "rrr", *LORA, "--learning-rate", "3e-5",
                                                         *DYNAMIC]),
    "grpo-lora-3e-5-dyn-reflws": ("reflections-800", 40, ["--method", "grpo", *LORA, "--learning-rate", "3e-5",
                                                          *DYNAMIC]),
    "grpo-full-5e-6-dyn": ("answers-800", 40, ["--method", "grpo", "--learning-rate", "5e-6", *DYNAMIC]),
}

# The final stage's settings, chosen on the dev split (BENCHMARKS.md, "Learning"): the sweep's RRR configuration
# (rrr-lora-3e-5-dyn-reflws: at steps 10 and 20 its dev first and second tries rose, +3/-0 and +4/-0, +2/-0
# and +3/-0, nothing lost), for as many steps as keep a seed's four arms near 3 hours on 2 cores (B, fp32).
FINAL = dict(warm_start="reflections-800", steps=20, flags=[*LORA, "--learning-rate", "3e-5", *DYNAMIC])
ARMS = {"rrr": ["--method", "rrr"], "feedback": ["--method", "rrr", "--reflection-feedback"],
        "generic": ["--method", "rrr", "--reflection", "generic"], "grpo": ["--method", "grpo"]}
LABELS = {"rrr": "RRR (model's reflection)", "feedback": "RRR, feedback in the reflection prompt",
          "generic": "generic reflection", "grpo": "GRPO on first attempts"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--stage", choices=("sweep", "final", "rerest"), required=True,
                    help="sweep: SWEEP's configurations on the dev split; final: FINAL's settings, 4 arms, "
                         "on the test split over --seeds; rerest: rerest.py from FINAL's warm start, same "
                         "test split, over --seeds")
    ap.add_argument("--configs", nargs="+", choices=list(SWEEP), default=list(SWEEP),
                    help="--stage sweep: the configurations to run, in SWEEP's order (the table shows every "
                         "configuration evaluated so far)")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                    help="--stage final: the arms to run, in order (rrr first: the others reuse its failure "
                         "set); the tables cover every arm finished in a seed's folder, by this call or before")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                    help="--stage final: one run per arm and seed; --stage rerest: one rerest.py run per seed")
    ap.add_argument("--dpo", action="store_true", help="--stage rerest: also the DPO row")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="evaluate every N steps and at the end (default: 10 in the sweep, for its curves; 20 "
                         "in the final stage, where an evaluation of 500 puzzles costs about 7.5 minutes on B)")
    ap.add_argument("--out", type=Path, default=Path("runs/learning"), help="folder for the runs and tables")
    ap.add_argument("--results", type=Path, default=REPO / "bench/results/learning",
                    help="folder for the per-item results (and adapters) to commit")
    ap.add_argument("--bf16", action="store_true", help="bf16 instead of the fixed fp32")
    ap.add_argument("--table-only", action="store_true",
                    help="--stage sweep: only tabulate what the runs have evaluated so far (runs nothing)")
    args = ap.parse_args(argv)
    if args.arms[0] != "rrr":
        ap.error("--arms must start with rrr, whose failure set the other arms reuse")
    if args.eval_every is None:
        args.eval_every = 10 if args.stage == "sweep" else 20
    if args.eval_every < 1:
        ap.error("--eval-every must be at least 1")
    return args


def machine(bf16: bool) -> str:
    """The CPU (model name, AMX or not), core count and dtype: every figure says what produced it."""
    name = platform.processor() or "cpu"
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        name += ", AMX" if "amx_bf16" in info else ", no AMX"
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {'bf16' if bf16 else 'fp32'}"


def minutes_spent(folder: Path) -> float | None:
    """What a run has cost over all its invocations (folder/bench_minutes.json; None if never timed)."""
    spent = folder / "bench_minutes.json"
    return json.loads(spent.read_text())["minutes"] if spent.exists() else None


def finished(folder: Path) -> bool:
    """Whether a run in `folder` ran to its end: rrr.py and rerest.py write report.json last but for exports."""
    return (folder / "report.json").exists()


def run_script(script: str, folder: Path, flags: list[str]):
    """One run of rrr.py or rerest.py into `folder`, its minutes added to folder/bench_minutes.json. A
    finished run (report.json) is kept; an unfinished rrr.py run is resumed (--resume), an unfinished
    rerest.py run simply runs again (every stage is cached in its folder)."""
    if finished(folder):
        print(f"{folder}: finished before, kept", flush=True)
        return
    before = minutes_spent(folder) or 0.0
    cmd = [sys.executable, str(REPO / script), *flags, "--out", str(folder)]
    if script == "rrr.py" and (folder / "config.json").exists():
        cmd.append("--resume")
    print(f"\n== {folder}: {' '.join(cmd[1:])}", flush=True)
    started = time.time()
    try:
        subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:        # an interrupted invocation's time counts too
        if folder.exists():
            write_json(folder / "bench_minutes.json", dict(minutes=round(before + (time.time() - started) / 60, 2)))
    print(f"== {folder}: {minutes_spent(folder):.1f} min", flush=True)


def dtype_flags(args) -> list[str]:
    return ["--bf16"] if args.bf16 else ["--no-bf16"]


def run_log(folder: Path) -> dict:
    """A run's metrics per step, accuracy per evaluation and per-item results per evaluation."""
    return dict(metrics=read_jsonl(folder / "metrics.jsonl"), evals=read_jsonl(folder / "evals.jsonl"),
                answers=[dict(step=r["step"], id=r["id"], first=tries_of(r)[0], second=tries_of(r)[1])
                         for r in read_jsonl(folder / "eval_answers.jsonl")])


def retries_table(folders: dict) -> str:
    """Where a second try's gain comes from, per run at its first and last evaluation: the failed first
    tries, the retries that repeat the failed equation (spaces aside), and the failures the retry fixed.
    A second try that rises only with the first says nothing for the reflection."""
    rows = []
    for name, folder in folders.items():
        answers = read_jsonl(folder / "eval_answers.jsonl")
        steps = sorted({a["step"] for a in answers})
        for step in (steps[0], steps[-1]) if len(steps) > 1 else steps:
            failed = [a for a in answers if a["step"] == step and not tries_of(a)[0] and a.get("judged", True)]
            repeated = sum(equation(a.get("retry", "")) == equation(a["attempt"]) for a in failed)
            fixed = sum(bool(tries_of(a)[1]) for a in failed)
            rows.append({"run": name, "step": step, "failed first tries": len(failed),
                         "retry repeats the failed equation": repeated,
                         "fixed by the retry": f"{fixed} ({pct(fixed / max(len(failed), 1))})"})
    return ("Retries at the first and last evaluation of each run (greedy): a failed first try gets a "
            "reflection and a retry.\n\n" + markdown_table(list(rows[0]), rows) if rows else "")


def equation(text: str) -> str:
    """The text between <answer> and </answer> (the whole text if there is none), without spaces."""
    inner = text.split("<answer>", 1)[-1].split("</answer>", 1)[0]
    return "".join(inner.split())


def curves_figure(path: Path, logs: dict, labels: dict, title: str):
    """Two panels, every run in each: (a) training reward per step over every group drawn (with
    --dynamic-sampling the trained groups are the ones whose rewards differ: their reward and their share
    of zero-variance groups would say nothing of the policy) and zero-variance groups among those trained
    (dotted); (b) first-try (solid, o) and second-try (dashed, x) accuracy per evaluation."""
    from matplotlib.ticker import PercentFormatter
    fig = _figure((13.0, 5.0))
    a, b = fig.subplots(1, 2)
    for i, (name, log) in enumerate(logs.items()):
        steps = [m["step"] for m in log["metrics"]]
        a.plot(steps, [m.get("reward_drawn", m["reward"]) for m in log["metrics"]], color=f"C{i}", lw=1,
               label=f"{labels[name]}: reward")
        a.plot(steps, [m["zero_variance_groups"] for m in log["metrics"]], color=f"C{i}", ls=":", lw=1)
        at = [e["step"] for e in log["evals"]]
        b.plot(at, [e["first"] for e in log["evals"]], color=f"C{i}", marker="o", label=f"{labels[name]}: first try")
        b.plot(at, [e["second"] for e in log["evals"]], color=f"C{i}", marker="x", ms=8, ls="--",
               label=f"{labels[name]}: second try")
        if steps:
            _steps_axis(a, steps)
    a.set(title="(a) training reward, all groups drawn (dotted: zero-variance share trained)",
          xlabel="training step", ylabel="fraction", ylim=(-0.03, 1.03))
    b.set(title=f"(b) {title}", xlabel="training step", ylabel="accuracy")
    b.yaxis.set_major_formatter(PercentFormatter(1.0))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    _save(fig, path)


# --- the sweep -------------------------------------------------------------------------------------------

def sweep(args):
    root = args.out / "sweep"
    for name in [] if args.table_only else [n for n in SWEEP if n in args.configs]:     # SWEEP's order
        warm, steps, flags = SWEEP[name]
        common = [*COMMON, *WARM[warm], "--steps", str(steps), "--eval-split", "dev",
                  "--eval-size", "300", "--eval-every", str(args.eval_every), "--seed", "0", *dtype_flags(args)]
        # The runs of one warm start share the failure set of the first of them in SWEEP.
        owner = next(n for n, c in SWEEP.items() if c[0] == warm)
        if owner != name:
            if not (root / owner / "failures.jsonl").exists() and owner not in args.configs:
                raise SystemExit(f"{name} reuses {owner}'s failure set: run --configs {owner} first")
            common += ["--failure-set", str(root / owner / "failures.jsonl")]
        run_script("rrr.py", root / name, [*common, *flags])
    sweep_table(args, root)


def sweep_table(args, root: Path):
    """Every configuration of SWEEP evaluated at least once, finished or stopped: the failed and the
    unfinished ones are results too."""
    tried = [n for n in SWEEP if read_jsonl(root / n / "evals.jsonl")]
    logs = {n: run_log(root / n) for n in tried}
    minutes = {n: minutes_spent(root / n) for n in tried}
    done = {n: finished(root / n) for n in tried}
    rows = []
    for n in tried:
        log, last = logs[n], logs[n]["evals"][-1]["step"]
        vanilla, trained, _ = vanilla_and_last(root / n, last)
        first, second = (paired_change(vanilla["tries"][k], trained["tries"][k]) for k in (0, 1))
        rows.append({"configuration": n, "warm start": SWEEP[n][0],
                     "steps": f"{last}" if done[n] else f"{last} of {SWEEP[n][1]} (unfinished)",
                     "minutes": "?" if minutes[n] is None else f"{minutes[n]:.0f}",
                     "dev first try per evaluation": " → ".join(pct(e["first"]) for e in log["evals"]),
                     "dev second try": " → ".join(pct(e["second"]) for e in log["evals"]),
                     "first try: gained/lost, p": f"+{first['gained']}/−{first['lost']}, {first['p_value']:.3g}",
                     "second try: gained/lost, p": f"+{second['gained']}/−{second['lost']}, "
                                                   f"{second['p_value']:.3g}"})
    header = (f"# Sweep on the dev split (countdown_easy, 300 puzzles)\n\nMachine: {machine(args.bf16)}. "
              "Evaluations are greedy; gained/lost: items solved at the last evaluation and not at step 0, and "
              "the reverse; p: exact McNemar. Settings of every run: bench/learning.py's SWEEP and COMMON.\n\n")
    table = header + markdown_table(list(rows[0]) if rows else ["configuration"], rows)
    root.mkdir(parents=True, exist_ok=True)
    table += "\n\n" + retries_table({n: root / n for n in tried})
    (root / "sweep.md").write_text(table + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "sweep.json", dict(machine=machine(args.bf16), common=COMMON,
                                                 configs={n: dict(warm_start=WARM[SWEEP[n][0]], steps=SWEEP[n][1],
                                                                  flags=SWEEP[n][2], minutes=minutes[n],
                                                                  finished=done[n])
                                                          for n in tried},
                                                 runs=logs))
    if logs:
        curves_figure(root / "sweep.png", logs, {n: n for n in logs}, "dev accuracy per evaluation (300 puzzles)")
        shutil.copy(root / "sweep.png", args.results / "sweep.png")
    print(f"\n{table}\n\nwritten: {root / 'sweep.md'}, {root / 'sweep.png'}, {args.results / 'sweep.json'}")


# --- the final comparison --------------------------------------------------------------------------------

def final(args):
    root = args.out / "final"
    tables, logs = [], {}
    for seed in args.seeds:
        folder = root / f"seed-{seed}"
        for arm in args.arms:
            flags = [*COMMON, *WARM[FINAL["warm_start"]], "--steps", str(FINAL["steps"]),
                     "--eval-split", "test", "--eval-size", "500", "--eval-every", str(args.eval_every),
                     "--seed", str(seed), *dtype_flags(args), *FINAL["flags"], *ARMS[arm]]
            if arm != "rrr":
                flags += ["--failure-set", str(folder / "rrr" / "failures.jsonl")]
            run_script("rrr.py", folder / arm, flags)
        done = [a for a in ARMS if finished(folder / a)]     # this call's and earlier ones'
        logs |= {f"seed-{seed}/{a}": run_log(folder / a) for a in done}
        table, numbers = compare([folder / a for a in done])
        (folder / "comparison.md").write_text(table + "\n")
        write_json(folder / "comparison.json", numbers)
        tables.append(f"## seed {seed}\n\n{table}")
    pooled = pooled_table(args, logs) + "\n\n" + retries_table({k: root / k for k in logs})
    (root / "pooled.md").write_text(pooled + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "final.json", dict(machine=machine(args.bf16), common=COMMON, final=FINAL,
                                                 arms=ARMS, runs=logs))
    if "--use-peft" in FINAL["flags"]:
        for key in logs:
            keep_adapters(root / key / "adapters.safetensors",
                          args.results / "adapters" / f"{key.replace('/', '-')}.safetensors")
    curves_figure(root / "learning.png", logs, {k: k.replace("/", " ") for k in logs},
                  "test accuracy per evaluation (500 puzzles)")
    shutil.copy(root / "learning.png", args.results / "learning.png")
    print("\n\n".join(tables) + f"\n\n{pooled}\n\nwritten: {root}, {args.results / 'final.json'}")


def keep_adapters(source: Path, target: Path):
    """A run's LoRA adapters, stored in fp16 to keep the repository small (about 10 MB each for rank 16 on
    every linear layer of the 135M model; fp16 rounds by under 5e-4 relative, 3e-8 absolute below 6e-5, far
    inside the noise of sampling), with the header rrr.py wrote (rank, alpha, targets): add them to the
    warm-started model as rrr.py's export does (bench/merge_adapters.py), the warm start's folder name added
    to the header so that they are merged into the model they were trained on."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    if not source.exists():
        raise SystemExit(f"{source}: missing (the run was stopped after its report): rerun it to write it")
    with safe_open(str(source), "pt") as f:
        header = dict(f.metadata())
    warm = json.loads((source.parent / "config.json").read_text()).get("warm_start_model")
    if warm:
        header["warm_start_model"] = json.dumps(warm["folder"])
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() for k, v in load_file(source).items()}, target, metadata=header)


def pooled_table(args, logs: dict) -> str:
    """Every seed's runs of an arm against the vanilla model, with the item as the unit: an item counts as
    gained when its outcome after training, averaged over the seeds, is above its vanilla outcome (which
    greedy decoding makes the same in every seed), as lost when below; p is the exact sign test of gained
    against lost (McNemar's test when there is one seed). Pairs of (seed, item) would count each vanilla
    outcome once per seed, as if the seeds drew new items."""
    rows = []
    for arm in [a for a in ARMS if any(k.endswith("/" + a) for k in logs)]:
        keys = [k for k in logs if k.endswith("/" + arm)]
        for which in ("first", "second"):
            vanilla, trained = {}, {}
            for k in keys:
                last = logs[k]["evals"][-1]["step"]
                for a in logs[k]["answers"]:
                    if a["step"] == 0:
                        vanilla.setdefault(a["id"], []).append(a[which])
                    elif a["step"] == last:
                        trained.setdefault(a["id"], []).append(a[which])
            items = sorted(set(vanilla) & set(trained))
            before = {i: sum(vanilla[i]) / len(vanilla[i]) for i in items}
            after = {i: sum(trained[i]) / len(trained[i]) for i in items}
            gained, lost = sum(after[i] > before[i] for i in items), sum(after[i] < before[i] for i in items)
            rows.append({"arm": LABELS[arm], "try": which, "items": len(items), "seeds": len(keys),
                         "vanilla": pct(sum(before.values()) / max(len(items), 1)),
                         "trained (mean over seeds)": pct(sum(after.values()) / max(len(items), 1)),
                         "items gained/lost": f"+{gained}/−{lost}",
                         "p (exact sign test)": f"{mcnemar_exact(lost, gained):.3g}"})
    return (f"# Final stage, seeds {', '.join(map(str, args.seeds))} pooled\n\nMachine: {machine(args.bf16)}. "
            f"From the labelled warm start {FINAL['warm_start']} ({' '.join(WARM[FINAL['warm_start']])}). "
            + "An item is gained when its outcome after training, averaged over the seeds, is above its vanilla "
            "outcome (the same in every seed), lost when below; p: exact sign test of gained against lost.\n\n"
            + markdown_table(list(rows[0]), rows))


# --- Re-ReST from the same warm start -------------------------------------------------------------------

def rerest(args):
    """rerest.py per seed on the final stage's test puzzles; its rows' per-puzzle results and Re-ReST
    against self-training (exact McNemar on the same puzzles) in --results/rerest.json."""
    root, seeds, lines = args.out / "rerest", {}, []
    for seed in args.seeds:
        folder = root / f"seed-{seed}"
        run_script("rerest.py", folder, ["--task", "countdown_easy", *WARM[FINAL["warm_start"]],
                                         "--train-size", "512", "--eval-size", "500", "--max-completion-length",
                                         "32", "--seed", str(seed), *dtype_flags(args),
                                         *(["--dpo"] if args.dpo else [])])
        report = json.loads((folder / "report.json").read_text())
        rows = {name: row["items"] for name, row in report["rows"].items() if row.get("items")}
        change = paired_change(rows["self-training"], rows["Re-ReST"])
        seeds[seed] = dict(rows=rows, rerest_vs_self_training=change,
                           minutes=minutes_spent(folder), sizes=report["sizes"])
        lines.append(f"seed {seed}: " + ", ".join(f"{n} {pct(sum(r.values()) / len(r))}" for n, r in rows.items())
                     + f"; Re-ReST against self-training: +{change['gained']}/−{change['lost']}, "
                       f"p = {change['p_value']:.3g}")
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "rerest.json", dict(machine=machine(args.bf16), warm_start=WARM[FINAL["warm_start"]],
                                                  seeds=seeds))
    print("\n".join(lines) + f"\n\nwritten: {root}, {args.results / 'rerest.json'}")


def main(argv=None):
    args = parse_args(argv)
    # kill (SIGTERM) unwinds like Ctrl-C, so that an interrupted run's minutes are still counted
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        {"sweep": sweep, "final": final, "rerest": rerest}[args.stage](args)
        print(f"({(time.time() - started) / 60:.1f} min)")
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    main()
