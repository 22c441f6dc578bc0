"""rrr.py end to end on a tiny random model: 2 ranks against 1 process, kill and resume, bad input, and
the trained span of real rollouts on the embedded model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import parallel as par
import rrr
from runs import parse_config, read_jsonl
from test_grpo import free_port
from tiny import REPO, save_tiny_chat_model

ENV = dict(os.environ, PYTHONPATH=os.environ.get("STUBPATH", "") + os.pathsep + str(REPO), OMP_NUM_THREADS="1")


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
    return [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]


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
    args = common_args(tiny_chat, out)
    done = run_rrr(args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| vanilla |" in done.stdout
    for name in ("report.md", "report.json", "plot.png", "metrics.jsonl", "episodes.jsonl", "failures.jsonl"):
        assert (out / name).exists(), name
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    report = json.loads((out / "report.json").read_text())
    assert report["trained"]["step"] == 2 and report["vanilla"]["n"] == 4

    # Replay both updates in one process on the episodes the two ranks sampled: the losses, gradient
    # norms and final weights must match (RESEARCH.md pitfall 1).
    cfg = parse_config(rrr.Config, args)
    d = par.init_distributed("cpu")
    try:
        pol = rrr.load_policy(cfg, d)
        replay(cfg, d, pol, out, metrics, rel=1e-4, abs=1e-7)
        assert metrics[-1]["grad_norm"] > 1e-4 and metrics[-1]["mean_kl"] > 0     # a real update was compared
        exported = final_weights(out)
        for name, p in pol.model.named_parameters():
            assert torch.allclose(par.full_tensor(p.detach()), exported[name], atol=1e-5), name
    finally:
        par.close_distributed()

    # The export loads with transformers and with --model.
    from transformers import AutoModelForCausalLM

    from model import load_model
    AutoModelForCausalLM.from_pretrained(out / "final")
    model, tok = load_model(str(out / "final"), device="cpu")
    assert tok.chat_template


def replay(cfg, d, pol, out, metrics, rel, abs):
    """Replays each logged step's episodes through rrr.grpo_update in this process: its loss and gradient
    norm must equal the run's."""
    episodes = read_jsonl(out / "episodes.jsonl")
    for m in metrics:
        rows = [e for e in episodes if e["step"] == m["step"]]
        assert len(rows) == cfg.batch_size * cfg.num_generations
        eps = [rrr.Episode(**{k: v for k, v in e.items() if k != "step"}) for e in rows]
        for e in eps:
            e.span = tuple(e.span)
        stats = rrr.grpo_update(cfg, d, pol, eps)
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


@pytest.mark.parametrize("extra, message", [
    (["--task", "nope"], "invalid choice"),
    (["--model", "/no/such/model"], "error:"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_chat, extra, message):
    args = common_args(tiny_chat, tmp_path / "x") + extra
    done = run_rrr(args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_out_with_another_run_is_refused_and_kept(tmp_path, tiny_chat):
    out = tmp_path / "x"
    out.mkdir()
    (out / "config.json").write_text('{"task": "countdown", "keep": "me"}')
    done = run_rrr(common_args(tiny_chat, out))
    assert done.returncode == 2 and "--resume" in done.stderr and "Traceback" not in done.stderr
    assert (out / "config.json").read_text() == '{"task": "countdown", "keep": "me"}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_trained_span_is_exactly_the_reflection_embedded(embedded, tmp_path):
    """Real rollouts on the embedded model: the trained tokens decode to the reflection and nothing
    else, the context is the conversation the chat template renders, and the stop token ending the
    reflection is trained (RESEARCH.md pitfall 2)."""
    model, tok = embedded
    cfg = parse_config(rrr.Config, ["--task", "countdown", "--max-completion-length", "24",
                                    "--max-reflection-length", "160", "--num-generations", "3", "--beta", "0"])
    task, train, _ = rrr.load_splits(parse_config(rrr.Config, ["--train-size", "2", "--eval-size", "1"]))
    d = par.Dist(0, 1, torch.device("cpu"))
    pol = rrr.Policy(model, model, None, tok, [tok.eos_token_id], None)
    prompts = [rrr.chat_ids(tok, ex.messages) for ex in train]
    gen = rrr.sample(pol, prompts, cfg, max_new_tokens=24, temperature=0)
    failures = [rrr.Failure(ex.id, t, rrr.stop_of(t, f), "", 1) for ex, t, f in zip(train, gen.tokens, gen.finished)]
    episodes = rrr.rollout(cfg, d, pol, task, failures, {ex.id: ex for ex in train}, step=0)
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
