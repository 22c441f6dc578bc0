"""rrr.py end to end on a tiny random model: 2 ranks against 1 process, kill and resume, bad input, and
the trained span of real rollouts on the embedded model."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import parallel as par
import failures
import rrr
from data import load_splits
from failures import Failure
from policy import Policy, stop_of
from runs import parse_config, read_jsonl
from test_grpo import free_port
from verifiers import Verdict
from tiny import (PLANTED_PUZZLE, PLANTED_REFLECTIONS, REPO, save_planted_reflection_model,
                  save_tiny_chat_model)

# Offline data unless a test passes --data-dir: the runs' item ids are the generator's and the samples'.
ENV = {k: v for k, v in os.environ.items() if k != "RRR_DATA_DIR"}
ENV.update(PYTHONPATH=os.environ.get("STUBPATH", "") + os.pathsep + str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"), seed=3)


def common_args(model, out, **extra):
    # The tiny model never earns a reward, so every advantage is 0 and the KL to the reference is the
    # whole gradient; weight decay moves the weights off the reference after step 1, so that later
    # steps have a nonzero gradient and the replay and resume tests compare real updates.
    args = dict(model=model, task="countdown", out=out, steps=2, train_size=4, eval_size=4, batch_size=2,
                num_generations=2, failure_samples=1, max_completion_length=12, max_reflection_length=8,
                learning_rate=1e-3, weight_decay=10, beta=0.01, micro_batch_size=8, log_episodes=100,
                save_every=0, device="cpu", seed=5)
    args.update(extra)
    # fp32 pinned: the exact comparisons below are fp32's, and the CPU default is bf16 where AMX is present.
    return [f"--{k.replace('_', '-')}={v}" for k, v in args.items()] + ["--no-bf16"]


def run_rrr(args, nproc=1, **kw):
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "rrr.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(REPO / "rrr.py")]
    return subprocess.run(cmd + args, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def final_weights(out):
    return load_file(str(Path(out) / "final" / "model.safetensors"))


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_write_everything(tmp_path, tiny_chat):
    out = tmp_path / "run"
    args = common_args(tiny_chat, out, forgetting_eval="gsm8k")
    done = run_rrr(args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| vanilla |" in done.stdout and "gsm8k first try (4 items)" in done.stdout
    # The forgetting check: the same 4 GSM8K items before and after, gathered from both ranks, and the
    # report's change and McNemar p-value recomputed here from those rows.
    rows = read_jsonl(out / "forgetting.jsonl")
    before = {r["id"]: r["ok"] for r in rows if r["step"] == 0}
    after = {r["id"]: r["ok"] for r in rows if r["step"] == 2}
    assert len(rows) == 8 and len(before) == 4 and before.keys() == after.keys()
    lost, gained = sum(before[i] and not after[i] for i in before), sum(after[i] and not before[i] for i in before)
    p = min(1.0, 2 * sum(math.comb(lost + gained, k) for k in range(min(lost, gained) + 1)) / 2 ** (lost + gained))
    forgot = json.loads((out / "report.json").read_text())["forgetting"]["gsm8k"]
    assert (forgot["change"]["lost"], forgot["change"]["gained"], forgot["change"]["p_value"]) == (lost, gained, p)
    assert forgot["before"] == sum(before.values()) / 4
    report = (out / "report.md").read_text()
    assert "4 of " in report and "a subset" in report and "forgetting, gsm8k first try" in report
    for name in ("report.md", "report.json", "plot.png", "metrics.jsonl", "episodes.jsonl", "failures.jsonl"):
        assert (out / name).exists(), name
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    report = json.loads((out / "report.json").read_text())
    assert report["trained"]["step"] == 2 and report["vanilla"]["n"] == 4

    # Replay both updates in one process on the episodes the two ranks sampled: the losses, gradient
    # norms and final weights must match (loss normalisation across micro-batches and ranks: TRL issue
    # #3021, PR #3231).
    cfg = parse_config(rrr.Config, args)
    d = par.init_distributed("cpu")
    try:
        pol = rrr.load_policy(cfg, d)
        replay(cfg, d, pol, out, metrics, rel=1e-4, abs=1e-7)
        assert metrics[-1]["grad_norm"] > 1e-4 and metrics[-1]["mean_kl"] > 0     # a real update was compared
        # Adam divides each gradient by its own running RMS, so where a gradient is near zero the
        # all-reduce's summation order (2 ranks against 1 process) becomes a visible part of a step: a few
        # weights may differ by up to a few per cent of the learning rate. A missed, doubled or
        # unsynchronised step moves weights by about the learning rate, far beyond this bound.
        exported, off, total = final_weights(out), 0, 0
        for name, p in pol.model.named_parameters():
            diff = (par.full_tensor(p.detach()) - exported[name]).abs()
            assert diff.max() <= 0.1 * cfg.learning_rate, name
            off, total = off + int((diff > 1e-5).sum()), total + diff.numel()
        assert off <= 1e-4 * total, f"{off} of {total} weights off by more than 1e-5"
    finally:
        par.close_distributed()

    # The export loads with transformers and with --model.
    from transformers import AutoModelForCausalLM

    from model import load_model
    AutoModelForCausalLM.from_pretrained(out / "final")
    model, tok = load_model(str(out / "final"), device="cpu")
    assert tok.chat_template


def replay(cfg, d, pol, out, metrics, rel, abs):
    """Replays each logged step's episodes through policy.grpo_update (as rrr.py calls it) in this process: its loss and gradient
    norm must equal the run's."""
    episodes = read_jsonl(out / "episodes.jsonl")
    for m in metrics:
        rows = [e for e in episodes if e["step"] == m["step"]]
        assert len(rows) == cfg.batch_size * cfg.num_generations
        eps = [rrr.Episode(**{k: v for k, v in e.items() if k != "step"}) for e in rows]
        for e in eps:
            e.span = tuple(e.span)
        stats = rrr.grpo_update(cfg, d, pol, eps, rrr.trained_length_limit(cfg))
        assert stats["loss"] == pytest.approx(m["loss"], rel=rel, abs=abs), m["step"]
        assert stats["grad_norm"] == pytest.approx(m["grad_norm"], rel=rel), m["step"]


def kill_and_resume(tmp_path, args_for):
    """Runs rrr.py straight to the end in tmp_path/a, and in tmp_path/b kills it (SIGKILL) after its
    second checkpoint and resumes it: both must end with exactly the same weights. args_for(out) gives
    the command-line flags. Returns tmp_path/b."""
    straight = run_rrr(args_for(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(REPO / "rrr.py")] + args_for(out),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_000002":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()

    resumed = run_rrr(args_for(out) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final_weights(tmp_path / "a"), final_weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    return out


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(tmp_path, tiny_chat):
    out = kill_and_resume(tmp_path, lambda o: common_args(tiny_chat, o, steps=5, save_every=1, train_size=6))
    # The failure set was built once: a header and one row per training query, no repeats.
    rows = read_jsonl(out / "failures.jsonl")
    assert "meta" in rows[0] and len(rows) == 1 + 6 and len({r["id"] for r in rows[1:]}) == 6
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def transformers_lrs(kind, learning_rate, warmup_ratio, steps) -> list[float]:
    """The rate of each of `steps` optimizer steps under transformers' get_scheduler(kind), warmup steps as
    TrainingArguments counts them (ceil of the ratio times the steps), read off a dummy optimizer."""
    from transformers import get_scheduler
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=math.ceil(warmup_ratio * steps),
                              num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.slow
def test_kill_and_resume_with_a_cosine_schedule_gives_identical_weights(tmp_path, tiny_chat):
    """The schedule is a function of the step alone: resumed after a kill, the run goes on at the rates the
    straight run used (transformers' cosine with warmup) and ends with the same weights, bit for bit."""
    schedule = dict(lr_scheduler_type="cosine", warmup_ratio=0.25)
    out = kill_and_resume(tmp_path, lambda o: common_args(tiny_chat, o, steps=4, save_every=1, **schedule))
    want = transformers_lrs("cosine", 1e-3, 0.25, 4)
    assert [m["learning_rate"] for m in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == want
    assert [m["learning_rate"] for m in read_jsonl(out / "metrics.jsonl")] == want
    assert want == pytest.approx([0, 1e-3, 7.5e-4, 2.5e-4])      # a warmup step, then half a cosine


def test_linear_schedule_with_warmup_is_transformers(tmp_path, tiny_chat):
    out = tmp_path / "run"
    done = run_rrr(common_args(tiny_chat, out, steps=4, lr_scheduler_type="linear", warmup_ratio=0.25))
    assert done.returncode == 0, done.stderr[-3000:]
    want = transformers_lrs("linear", 1e-3, 0.25, 4)
    assert [m["learning_rate"] for m in read_jsonl(out / "metrics.jsonl")] == want
    assert want == pytest.approx([0, 1e-3, 2e-3 / 3, 1e-3 / 3])       # one warmup step, then down toward 0


def test_failure_set_is_reused_by_another_run(tmp_path, tiny_chat):
    first = run_rrr(common_args(tiny_chat, tmp_path / "a", steps=1))
    assert first.returncode == 0, first.stderr[-3000:]
    shared = tmp_path / "a" / "failures.jsonl"
    before = shared.read_text()
    other = run_rrr(common_args(tiny_chat, tmp_path / "g", steps=1, method="grpo", failure_set=shared))
    assert other.returncode == 0, other.stderr[-3000:]
    assert shared.read_text() == before and not (tmp_path / "g" / "failures.jsonl").exists()
    # grpo trains first attempts: its episodes' context is the bare prompt.
    ep = read_jsonl(tmp_path / "g" / "episodes.jsonl")[0]
    assert ep["text"]["reflection"] is None and ep["span"][1] - ep["span"][0] <= 12


def test_report_to_tensorboard_holds_the_metrics_and_evaluations_of_the_run(tmp_path, tiny_chat):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    done = run_rrr(common_args(tiny_chat, out, report_to="tensorboard"))
    assert done.returncode == 0, done.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    metrics, evals = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "evals.jsonl")
    for key in ("reward", "loss", "grad_norm", "mean_kl", "zero_variance_groups", "trained_length"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(m["step"], pytest.approx(m[key])) for m in metrics]
    assert [(e.step, e.value) for e in events.Scalars("eval/second_try")] == [(e["step"], e["second"]) for e in evals]
    assert [e["step"] for e in evals] == [0, 2]


def test_failure_set_resumed_after_a_kill_equals_an_uninterrupted_one(tmp_path, tiny_chat):
    """A run killed while appending a chunk of the failure set leaves the earlier chunks and a cut line:
    resumed, it must end with the failures (and the file) of a run never interrupted. Several chunks, so
    that a chunk's seed counted from the rows already on disk, or a chunk redone only in part, differs."""
    cfg = parse_config(rrr.Config, common_args(tiny_chat, tmp_path, train_size=7, sampling_batch_size=2,
                                               failure_samples=2, beta=0))
    cfg.bf16 = False
    d = par.init_distributed("cpu")
    try:
        pol = rrr.load_policy(cfg, d)
        task, train, _ = load_splits(cfg.task, cfg.data_dir, cfg.train_size, cfg.eval_size, cfg.seed)
        (tmp_path / "a").mkdir()
        straight = failures.build_failure_set(cfg, d, pol, task, train, tmp_path / "a")
        text = (tmp_path / "a" / "failures.jsonl").read_text()
        lines = text.splitlines(keepends=True)
        assert len(lines) == 1 + 7 and len(straight) >= 4
        assert len({tuple(f.attempt) for f in straight}) == len(straight)      # sampled, not all alike
        # Killed within chunk 1 (rows 3 and 4 of the file): on its first line, or after its first line.
        for name, cut in (("b", 3), ("c", 4)):
            out = tmp_path / name
            out.mkdir()
            (out / "failures.jsonl").write_text("".join(lines[:cut]) + lines[cut][:len(lines[cut]) // 2])
            resumed = failures.build_failure_set(cfg, d, pol, task, train, out)
            assert [asdict(f) for f in resumed] == [asdict(f) for f in straight], name
            assert (out / "failures.jsonl").read_text() == text, name
    finally:
        par.close_distributed()


@pytest.mark.parametrize("case", ["missing", "foreign", "unfinished"])
def test_failure_set_missing_or_foreign_is_refused_and_nothing_created(tmp_path, tiny_chat, case):
    args = common_args(tiny_chat, tmp_path / "out")
    meta = failures.failure_set_meta(parse_config(rrr.Config, args))
    shared = tmp_path / "failures.jsonl"
    rows = [dict(id=f"countdown-gen-train-s5-{i}", failed=False, samples=1) for i in range(4)]
    if case == "foreign":       # another run's: a seed, a model and a warm start other than this run's
        rows = [dict(meta=dict(meta, seed=9, model="other/model", warm_start_reflections=True))] + rows
    elif case == "unfinished":  # this run's settings, killed after its first chunk
        rows = [dict(meta=meta)] + rows[:1]
    if case != "missing":
        shared.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = shared.read_bytes() if case != "missing" else None
    done = run_rrr(args + [f"--failure-set={shared}"])
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    expected = {"missing": ["no such file"], "foreign": ["other settings", "seed: 9 there, 5 here", "model:",
                                                         "warm_start_reflections: True there, None here"],
                "unfinished": ["lacks 3 of this run's 4 training queries"]}[case]
    assert all(m in done.stderr for m in expected), done.stderr
    assert not (tmp_path / "out").exists()
    assert (shared.read_bytes() if case != "missing" else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if case == "missing" else ["failures.jsonl"])


@pytest.mark.parametrize("method, reflection, limit", [
    ("rrr", "model", 8),        # the reflection is trained: --max-reflection-length
    ("rrr", "generic", 12),     # the retry is trained: --max-completion-length
    ("grpo", "model", 12),      # the first attempt is trained: --max-completion-length
])
def test_dr_grpo_divides_by_the_trained_parts_length_limit(tiny_chat, tmp_path, method, reflection, limit):
    """dr_grpo's loss is sum(per-token loss) / (rows x the trained part's max length). At the first update
    the ratio is exactly 1, so each token's loss is -advantage; two groups in two micro-batches."""
    cfg = parse_config(rrr.Config, common_args(tiny_chat, tmp_path, method=method, reflection=reflection,
                                               loss_type="dr_grpo", beta=0, micro_batch_size=2))
    cfg.bf16 = False
    assert (cfg.max_completion_length, cfg.max_reflection_length) == (12, 8)
    lengths, advantages = [3, 5, 4, 2], [1.0, -1.0, 0.5, -0.5]
    context = [[11, 12, 13], [21, 22]]
    episodes = [rrr.Episode("q", context[r // 2] + list(range(100, 100 + n)), (len(context[r // 2]), len(context[r // 2]) + n),
                            0.0, False, n, advantage=a) for r, (n, a) in enumerate(zip(lengths, advantages))]
    # -(3 - 5 + 2 - 1) / (4 rows x limit)
    expected = -sum(n * a for n, a in zip(lengths, advantages)) / (len(episodes) * limit)
    d = par.init_distributed("cpu")
    try:
        pol = rrr.load_policy(cfg, d)
        stats = rrr.grpo_update(cfg, d, pol, episodes, rrr.trained_length_limit(cfg))
    finally:
        par.close_distributed()
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["mean_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("extra, message", [
    (["--task", "nope"], "invalid choice"),
    (["--model", "/no/such/model"], "error:"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eval-every", "-1"], "--eval-every must be at least 0"),      # % -1 would evaluate every step
    (["--data-dir", "/no/such/folder"], "does not exist"),
    (["--warm-start", "10", "--task", "mbpp"], "--warm-start needs a task with a solver"),
    (["--warm-start", "-1"], "--warm-start must be at least 0"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_chat, extra, message):
    args = common_args(tiny_chat, tmp_path / "x") + extra
    done = run_rrr(args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_out_with_another_run_is_refused_and_kept(tmp_path, tiny_chat):
    out = tmp_path / "x"
    out.mkdir()
    (out / "config.json").write_text('{"task": "countdown", "keep": "me"}')
    done = run_rrr(common_args(tiny_chat, out))
    assert done.returncode == 2 and "--resume" in done.stderr and "Traceback" not in done.stderr
    assert (out / "config.json").read_text() == '{"task": "countdown", "keep": "me"}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_a_run_whose_weights_did_not_change_says_so(tmp_path, tiny_chat):
    """The tiny model never earns a reward: every advantage is 0 and, the policy never leaving the reference,
    the KL term has no gradient either. Without weight decay no weight moves; the run must say so (stdout,
    report.md, the row's name) instead of calling the initial model "trained". Checked against the weights
    themselves: the exported model equals the one the run started from, bit for bit."""
    out = tmp_path / "run"
    done = run_rrr(common_args(tiny_chat, out, weight_decay=0, steps=2, save_every=0))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(m["grad_norm"] == 0 for m in read_jsonl(out / "metrics.jsonl"))
    start, end = load_file(str(tiny_chat / "model.safetensors")), final_weights(out)
    assert all(torch.equal(end[name], start[name]) for name in start)
    line = "weights unchanged: no step had a nonzero gradient"
    assert sum(line in x for x in done.stdout.splitlines()) == 1, done.stdout[-2000:]
    report = (out / "report.md").read_text()
    assert "Weights unchanged: no step had a nonzero gradient" in report
    assert "| trained (2 steps, weights unchanged) |" in report
    # With weight decay the weights do move (toward 0), and the run says that this is all that moved them.
    decayed = run_rrr(common_args(tiny_chat, tmp_path / "decayed", steps=1, save_every=0))
    assert decayed.returncode == 0, decayed.stderr[-3000:]
    assert "weights changed by weight decay only" in decayed.stdout
    moved = final_weights(tmp_path / "decayed")
    assert any(not torch.equal(moved[name], start[name]) for name in start)


def test_trained_span_is_exactly_the_reflection_embedded(embedded, tmp_path):
    """Real rollouts on the embedded model: the trained tokens decode to the reflection and nothing
    else, the context is the conversation the chat template renders, and the stop token ending the
    reflection is trained (left padding, or a pad id equal to EOS, would hide the EOS tokens inside chat
    prompts and the one that ends the reflection)."""
    model, tok = embedded
    cfg = parse_config(rrr.Config, ["--task", "countdown", "--max-completion-length", "24",
                                    "--max-reflection-length", "160", "--num-generations", "3", "--beta", "0"])
    rrr.resolve_flags(cfg, rrr.run_folder(cfg))
    task, train, _ = load_splits("countdown", None, 2, 1, 0)
    d = par.Dist(0, 1, torch.device("cpu"))
    pol = Policy(model, model, None, tok, [tok.eos_token_id], None)
    prompts = [rrr.chat_ids(tok, ex.messages) for ex in train]
    gen = rrr.sample(pol.sampler, pol.stops, prompts, cfg, max_new_tokens=24, temperature=0)
    failures = [Failure(ex.id, t, stop_of(t, f), "", "", 1) for ex, t, f in zip(train, gen.tokens, gen.finished)]
    run = rrr.Run(cfg, d, pol, task, [], {ex.id: ex for ex in train}, tmp_path)
    episodes = rrr.rollout(run, failures, step=0)
    assert len(episodes) == 6
    ended = 0
    for e in episodes:
        a, b = e.span
        assert b == len(e.ids)
        reflection = e.ids[a:b]
        assert tok.decode(reflection, skip_special_tokens=True) == e.text["reflection"]
        if not e.truncated:
            ended += 1
            assert reflection[-1] == tok.eos_token_id
        ex = next(x for x in train if x.id == e.id)
        conversation = ex.messages + [
            {"role": "assistant", "content": e.text["attempt"]},
            {"role": "user", "content": task.reflection_prompt},
            {"role": "assistant", "content": e.text["reflection"]}]
        rendered = tok.apply_chat_template(conversation, tokenize=False)
        assert rendered.startswith(tok.decode(e.ids)), (rendered[-300:], tok.decode(e.ids)[-300:])
    assert ended > 0


FAULTS_SCRIPT = """
import resource, sys, torch
import parallel
if sys.argv[1] == "keep":
    assert parallel.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    torch.ones(50 * 2**20)                   # 200 MB, freed at once
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 51200)
"""


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
@pytest.mark.skipif(THP.exists() and "[always]" in THP.read_text(), reason="huge pages: few faults either way")
def test_freed_memory_is_reused_without_page_faults():
    """The premise and the fix of parallel.keep_freed_memory: by default each fresh 200 MB tensor goes
    back to the OS when freed, and the next one faults in all its 51,200 pages again; kept, the freed
    memory is reused (after the heap settles in a few rounds)."""
    refills = {mode: float(subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], env=ENV, check=True,
                                          capture_output=True, text=True).stdout.split()[-1])
               for mode in ("default", "keep")}
    assert refills["default"] > 11
    assert refills["keep"] < 6


@pytest.mark.slow
@pytest.mark.parametrize("task", ["mbpp", "gsm8k", "countdown_easy"])
def test_every_task_trains(tmp_path, tiny_chat, task):
    """rrr.py --task accepts every task the project has, and a step trains with that task's verifier: the
    episodes' feedback is the verifier's own sentence for the retry (checked against the task's checker)."""
    from data import get_task
    out = tmp_path / task
    done = run_rrr(common_args(tiny_chat, out, task=task, steps=1, eval_size=2, train_size=2))
    assert done.returncode == 0, done.stderr[-3000:]
    episodes = read_jsonl(out / "episodes.jsonl")
    assert len(episodes) == 4 and json.loads((out / "config.json").read_text())["task"] == task
    t = get_task(task)
    examples = {ex.id: ex for ex in t.load("train", size=2, seed=5)}
    for e in episodes:
        verdict = t.check(e["text"]["retry"], examples[e["id"]])
        assert (verdict.ok, verdict.feedback) == (e["reward"] == 1.0, e["text"]["feedback"])
    # MBPP's evaluation also records its own (visible) tests alone, and the report shows them.
    answers = read_jsonl(out / "eval_answers.jsonl")
    assert all(("tries_base" in r and len(r["tries_base"]) == 2) == (task == "mbpp") for r in answers)
    assert ("MBPP's own tests" in (out / "report.md").read_text()) == (task == "mbpp")



@pytest.mark.slow
def test_rrr_learns_end_to_end_when_a_reflection_unlocks_the_retry(tmp_path):
    """The whole rrr.py path (failure set, rollout, group advantages, the reflection span, the update) must
    raise the training reward on a model whose retry succeeds only after one of its two reflections
    (tiny.save_planted_reflection_model): the good reflection's share, and with it the reward, rises from
    about one half. Fails when the advantages are zeroed or the trained span is moved off the reflection."""
    model = save_planted_reflection_model(tmp_path / "planted")
    data = tmp_path / "data" / "countdown"
    data.mkdir(parents=True)
    for split in ("train", "test"):       # the one planted puzzle, 8 times
        (data / f"countdown_3to4_{split}.jsonl").write_text((json.dumps(PLANTED_PUZZLE) + "\n") * 8)
    out = tmp_path / "run"
    args = common_args(model, out, data_dir=tmp_path / "data", steps=6, train_size=8, eval_size=2, batch_size=4,
                       num_generations=8, max_completion_length=16, weight_decay=0, beta=0.001,
                       micro_batch_size=16, log_episodes=32, seed=0)
    done = run_rrr(args)
    assert done.returncode == 0, done.stderr[-3000:]
    episodes = read_jsonl(out / "episodes.jsonl")
    assert len(episodes) == 6 * 32
    good, right = next(iter(PLANTED_REFLECTIONS.items()))
    for e in episodes:       # the reward is the verifier's on the retry, and the retry follows the reflection
        assert e["reward"] == float(e["text"]["retry"].strip() == right)

    def share(steps, key):
        rows = [e for e in episodes if e["step"] in steps]
        return sum(key(e) for e in rows), len(rows)

    # Step 1 against the last 3 steps: a two-proportion z statistic above 4 (one-sided p ~ 3e-5 if the
    # reward did not change), and the good reflection's share rises with it.
    (k1, n1), (k2, n2) = share({1}, lambda e: e["reward"]), share({4, 5, 6}, lambda e: e["reward"])
    pooled = (k1 + k2) / (n1 + n2)
    z = (k2 / n2 - k1 / n1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    assert 0.2 < k1 / n1 < 0.8 and z > 4, (k1 / n1, k2 / n2, z)
    (g1, _), (g2, _) = (share(s, lambda e: e["text"]["reflection"].strip() == good) for s in ({1}, {4, 5, 6}))
    assert g2 / n2 - g1 / n1 > 0.3
    rewards = [m["reward"] for m in read_jsonl(out / "metrics.jsonl")]
    assert rewards[0] == k1 / n1 and sum(rewards[3:]) / 3 == pytest.approx(k2 / n2)


def test_reward_parts_add_up_and_are_logged_as_means_over_the_judged_episodes(monkeypatch):
    """A reward() that names its parts (README's example: TinyZero's 0.1 for a well-formed wrong answer):
    the reward is their sum, an unjudged episode gets none, and step_metrics logs each part's mean over the
    judged episodes, as computed by hand here."""
    def tinyzero(verdict, completion, example):
        well_formed = "<answer>" in completion and "</answer>" in completion
        return {"correct": float(verdict.ok), "format": 0.1 * (well_formed and not verdict.ok)}

    monkeypatch.setattr(rrr, "reward", tinyzero)
    verdicts = [Verdict(True, ""), Verdict(False, ""), Verdict(False, "", infra=True), Verdict(False, "")]
    texts = ["<answer>1</answer>", "<answer>2</answer>", "<answer>3</answer>", "no tags"]
    rewards, judged, parts = rrr.rewards_of(verdicts, texts, [None] * 4, [0, 1, 2, 3], 5)
    assert rewards.tolist() == pytest.approx([1.0, 0.1, 0.0, 0.0, 0.0])
    assert judged.tolist() == [True, True, False, True, False]
    assert parts[:4] == [{"correct": 1.0, "format": 0.0}, {"correct": 0.0, "format": 0.1}, {},
                         {"correct": 0.0, "format": 0.0}]
    episodes = [rrr.Episode(id=str(i), ids=[1, 2], span=(1, 2), reward=rewards[i].item(), truncated=False,
                            sampled=1, judged=bool(judged[i]), parts=parts[i]) for i in range(4)]
    cfg = parse_config(rrr.Config, ["--num-generations", "4"])
    d = par.init_distributed("cpu")
    try:
        run = rrr.Run(cfg, d, None, None, [], {}, None)
        row = rrr.step_metrics(run, 1, episodes, {}, 1.0, 1.0, part_names=["correct", "format"])
        plain = rrr.step_metrics(run, 1, episodes, {}, 1.0, 1.0)        # a binary reward() names no parts
    finally:
        par.close_distributed()
    assert row["reward"] == pytest.approx(1.1 / 3) and row["not_judged"] == 1
    assert row["reward_correct"] == pytest.approx(1 / 3) and row["reward_format"] == pytest.approx(0.1 / 3)
    assert plain["reward"] == row["reward"] and not any(k.startswith("reward_") for k in plain)


@pytest.mark.parametrize("flags", [["--no-bf16"], ["--bf16"], ["--no-bf16", "--use-peft"]])
def test_layers_gathered_once_per_update_change_no_bit(tmp_path, monkeypatch, flags):
    """One CPU process keeps each layer gathered across an update's micro-batches
    (parallel.gathered_across_micro_batches): two updates in a row leave the same parameters, bit for bit,
    as gathering per micro-batch does (the block's reshard on exit must hand the second update the
    optimizer's new weights, not the first update's gathered copy)."""
    folder = save_tiny_chat_model(tmp_path / "tiny", seed=3)
    task, train, _ = load_splits("countdown", None, 2, 1, 0)
    failures = [Failure(ex.id, [], None, "", "", 1) for ex in train]
    gathered = par.gathered_across_micro_batches
    params = []
    d = par.init_distributed("cpu")
    try:
        for keep in (True, False):
            monkeypatch.setattr(par, "gathered_across_micro_batches",
                                gathered if keep else lambda model, d: contextlib.nullcontext())
            cfg = parse_config(rrr.Config, flags + [f"--model={folder}", "--method=grpo", "--num-generations=4",
                                                    "--max-completion-length=16", "--beta=0.04", "--batch-size=2",
                                                    "--learning-rate=1e-2", "--micro-batch-size=2", "--seed=3"])
            rrr.resolve_model_flags(cfg)
            pol = rrr.load_policy(cfg, d)
            run = rrr.Run(cfg, d, pol, task, [], {ex.id: ex for ex in train}, tmp_path)
            for step in range(2):
                with rrr.sampling(pol):
                    episodes = rrr.rollout(run, failures, step)
                for i, e in enumerate(episodes):       # the tiny model earns no reward: advantages by hand
                    e.advantage = float(i % 3 - 1)
                rrr.grpo_update(cfg, d, pol, episodes, rrr.trained_length_limit(cfg))
            params.append({n: par.full_tensor(p).detach().clone() for n, p in pol.model.named_parameters()})
    finally:
        par.close_distributed()
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][n], params[1][n]) for n in params[0])
