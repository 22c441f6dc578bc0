"""rerest.py (with finetune.py and report.py): the SFT and DPO losses against hand computations, LoRA against the plain model, the
reflector's prompt and D_R, the DPO pairs, the report's intervals and McNemar tests against hand
computations, and a tiny end-to-end run on 1 and 2 processes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
import parallel as par
import rerest
from finetune import span_mask, token_logprobs
from model import add_lora
from report import rerest_report
from runs import parse_config, read_jsonl
from test_grpo import free_port, logits_to_logprobs
from test_rrr import ENV
from tiny import REPO, save_tiny_chat_model, tiny_model


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"), seed=4)


@pytest.fixture
def one_process():
    d = par.init_distributed("cpu")
    yield d
    par.close_distributed()


def test_sft_loss_ignores_prompt_and_equals_hand_computation():
    model = tiny_model(vocab_size=40, seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (2, 9), generator=g)
    attn = torch.ones_like(ids)
    spans = [(4, 9), (6, 9)]                          # solution tokens; the rest is prompt
    mask = span_mask(spans, 9)
    loss = finetune.sft_loss(token_logprobs(model, ids, attn, mask), mask, total_tokens=8)
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)
    hand = -sum(logp[b, t - 1, ids[b, t]].item() for b, (s, e) in enumerate(spans) for t in range(s, e)) / 8
    assert loss.item() == pytest.approx(hand, rel=1e-5)

    logits = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    finetune.sft_loss(logits_to_logprobs(logits, ids), mask, 8).backward()
    for b, (s, e) in enumerate(spans):
        for t in range(9):
            assert (logits.grad[b, t].abs().sum() > 0) == (s <= t + 1 < e), (b, t)


def test_dpo_loss_equals_hand_computation():
    c, r = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    got = finetune.dpo_loss(c, r, rc, rr, beta=0.5)
    for i in range(2):
        margin = 0.5 * ((c[i] - rc[i]) - (r[i] - rr[i])).item()
        assert got[i].item() == pytest.approx(math.log(1 + math.exp(-margin)), rel=1e-6)


def test_lora_starts_as_identity_and_merges_exactly(one_process):
    model = tiny_model(vocab_size=64, seed=2)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    add_lora(model, r=4, alpha=8, seed=0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
        adapted = model(ids).logits
    assert not torch.allclose(adapted, before, atol=1e-3)
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    merged = tiny_model(vocab_size=64, seed=99)
    missing, unexpected = merged.load_state_dict(par.merged_state(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)


def sequence_logprob(model, prompt, target):
    ids = torch.tensor([prompt + target])
    mask = span_mask([(len(prompt), len(prompt) + len(target))], ids.shape[1])
    with torch.no_grad():
        return token_logprobs(model, ids, torch.ones_like(ids), mask).sum().item()


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_training_moves_the_model_toward_its_data(tmp_path, tiny_chat, one_process, kind):
    """SFT raises the likelihood of its targets; DPO raises the chosen-over-rejected margin (both LoRA,
    exported merged and reloaded through --model's loader)."""
    from model import load_model
    g = torch.Generator().manual_seed(3)
    rand = lambda n: torch.randint(100, 2000, (n,), generator=g).tolist()  # noqa: E731
    data = [(rand(6), rand(5), rand(5)) for _ in range(4)]
    if kind == "sft":
        data = [(p, c) for p, c, _ in data]
    cfg = parse_config(rerest.Config, ["--epochs", "6", "--learning-rate", "3e-3", "--batch-size", "4",
                                       "--micro-batch-size", "2", "--lora-r", "4", "--dpo-beta", "0.5"])
    base, _ = load_model(str(tiny_chat), device="cpu")
    folder = rerest.train_model(cfg, one_process, str(tiny_chat), data, tmp_path / "m", kind)
    trained, _ = load_model(str(folder), device="cpu")

    def score(m):
        if kind == "sft":
            return sum(sequence_logprob(m, p, c) for p, c in data)
        return sum(sequence_logprob(m, p, c) - sequence_logprob(m, p, r) for p, c, r in data)

    assert score(trained) > score(base) + 1.0, (score(base), score(trained))


def test_dpo_reference_is_sharded_in_the_compute_dtype(tmp_path, tiny_chat, one_process, monkeypatch):
    """With --bf16 the DPO reference is a frozen bf16 copy sharded like the trained model (2/N bytes
    per parameter per rank), not a full fp32 model on every rank; the trained model keeps fp32 masters."""
    seen = []
    real = finetune.token_logprobs

    def spy(model, *args, **kwargs):
        seen.append({(type(p).__name__, p.dtype, p.requires_grad) for p in model.parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(finetune, "token_logprobs", spy)
    data = [([5, 6, 7], [8, 9], [10, 11, 12])] * 2
    cfg = parse_config(rerest.Config, ["--epochs", "1", "--batch-size", "2", "--micro-batch-size", "2",
                                       "--lora-r", "0", "--bf16"])
    rerest.train_model(cfg, one_process, str(tiny_chat), data, tmp_path / "m", "dpo")
    assert seen[0] == {("DTensor", torch.bfloat16, False)}        # the reference (computed first)
    assert seen[1] == {("DTensor", torch.float32, True)}          # the trained model


def test_dpo_reference_with_lora_is_the_trained_model_with_its_adapters_off(tmp_path, tiny_chat, one_process,
                                                                          monkeypatch):
    """With LoRA no reference copy is loaded: the reference log-probs come from the trained model itself,
    with its adapters off, and equal those of the base model (here, at the first step, of the same model
    with its adapters on too, since B starts at 0)."""
    calls = []
    real = finetune.token_logprobs

    def spy(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        active = {m.active for m in model.modules() if hasattr(m, "active")}
        calls.append((id(model), active, out.detach().clone()))
        return out

    monkeypatch.setattr(finetune, "token_logprobs", spy)
    data = [([5, 6, 7], [8, 9], [10, 11, 12])] * 2
    cfg = parse_config(rerest.Config, ["--epochs", "1", "--batch-size", "2", "--micro-batch-size", "2",
                                       "--lora-r", "4", "--no-bf16"])
    rerest.train_model(cfg, one_process, str(tiny_chat), data, tmp_path / "m", "dpo")
    (ref_id, ref_active, ref_lp), (model_id, model_active, lp) = calls
    assert ref_id == model_id and ref_active == {False} and model_active == {True}
    assert torch.equal(ref_lp, lp)


class Killed(Exception):
    """Raised from an optimizer hook: the trainer stops there as if the process had been killed."""


def test_training_follows_the_schedule_and_resumes_it_at_the_global_step(tmp_path, tiny_chat, one_process,
                                                                          monkeypatch):
    """train_model sets every optimizer step's rate to transformers' linear schedule with warmup (read by a
    hook before each step). Stopped inside its second epoch and run again, it resumes from the first
    epoch's checkpoint at the rates of the global steps, and ends with the straight run's weights."""
    from safetensors.torch import load_file
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from test_rrr import transformers_lrs
    data = [([5, 6, 7], [8 + i, 9]) for i in range(4)]        # 2 steps per epoch, 6 in all
    cfg = parse_config(rerest.Config, ["--epochs", "3", "--batch-size", "2", "--micro-batch-size", "2",
                                       "--lora-r", "0", "--learning-rate", "1e-3", "--lr-scheduler-type",
                                       "linear", "--warmup-ratio", "0.25", "--no-bf16"])
    seen, stop_before, loading = [], [None], [False]

    def record(optimizer, args, kwargs):
        if loading[0]:      # torch's DCP initialises the optimizer's state to load by a step at rate 0
            return
        if len(seen) == stop_before[0]:
            raise Killed
        seen.append(optimizer.param_groups[0]["lr"])

    def load_checkpoint(*args, real=par.load_checkpoint):
        loading[0] = True
        try:
            return real(*args)
        finally:
            loading[0] = False

    monkeypatch.setattr(par, "load_checkpoint", load_checkpoint)

    want = transformers_lrs("linear", 1e-3, 0.25, 6)
    hook = register_optimizer_step_pre_hook(record)
    try:
        rerest.train_model(cfg, one_process, str(tiny_chat), data, tmp_path / "a")
        assert seen == want and want[:3] == [0, 5e-4, 1e-3]           # a warmup of ceil(0.25 x 6) = 2 steps
        seen.clear()
        stop_before[0] = 3             # the fourth step, after the checkpoint of the first epoch (step 2)
        with pytest.raises(Killed):
            rerest.train_model(cfg, one_process, str(tiny_chat), data, tmp_path / "b")
        seen.clear()
        stop_before[0] = None
        rerest.train_model(cfg, one_process, str(tiny_chat), data, tmp_path / "b")
        assert seen == want[2:]
    finally:
        hook.remove()
    a, b = (load_file(str(tmp_path / x / "model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_warm_start_keeps_its_cache_folder_with_the_default_schedule(tmp_path, tiny_chat, one_process,
                                                                      monkeypatch):
    """Warm starts cached before the schedule was a setting keep their folder: with the default schedule
    the key is the one they were named by, written out here as it was; another schedule, or labelled
    reflections, gets a folder of its own and trains with it."""
    import hashlib

    import warmstart
    monkeypatch.setenv("RRR_CACHE", str(tmp_path))
    trained, rows = [], []

    def train_model(settings, d, init, data, folder):       # what the warm start trains with, and its folder
        trained.append(settings)
        rows.append(data)
        folder.mkdir(parents=True)

    monkeypatch.setattr(finetune, "train_model", train_model)
    folder, card = warmstart.warm_start(one_process, "countdown_easy", 3, str(tiny_chat))
    before = json.dumps(dict(task="countdown_easy", puzzles=3, model=str(tiny_chat), data_dir=None, bf16=False,
                             lr=1e-4, batch=16, seed=1_000_001, version=1), sort_keys=True)
    assert folder == tmp_path / "warm-start" / f"countdown_easy-3-{hashlib.sha256(before.encode()).hexdigest()[:10]}"
    assert (trained[0].lr_scheduler_type, trained[0].warmup_ratio) == ("constant", 0.0)
    cosine, card = warmstart.warm_start(one_process, "countdown_easy", 3, str(tiny_chat), schedule=("cosine", 0.1))
    assert cosine != folder and (trained[1].lr_scheduler_type, trained[1].warmup_ratio) == ("cosine", 0.1)
    assert (card["lr_scheduler_type"], card["warmup_ratio"]) == ("cosine", 0.1)
    # The reflection turn labelled too: a folder of its own, three rows per puzzle, said in the description.
    reflected, card = warmstart.warm_start(one_process, "countdown_easy", 3, str(tiny_chat), reflections=True)
    assert reflected not in (folder, cosine) and len(rows[2]) == 3 * len(rows[0]) == 9
    assert card["reflections"] and card["description"].endswith(warmstart.REFLECTIONS)


def test_reflector_sees_feedback_verbatim_and_d_r_only_passes(tmp_path, one_process, monkeypatch):
    """The reflector is a stub that answers with the reference program on odd calls: D_R must hold
    exactly the corrections the verifier accepts, and every prompt must carry its feedback verbatim."""
    from data import get_task
    from model import load_tokenizer
    task = get_task("mbpp")
    train = task.load("train", size=3)
    examples = {ex.id: ex for ex in train}
    tok = load_tokenizer(None)
    samples = [dict(key=ex.id, j=j, text="def f(:", ok=False, feedback=f"SyntaxError: feedback-{ex.id}-{j} <x>")
               for ex in train for j in range(2)]
    seen = []

    def fake_sample(model, stops, prompts, cfg, temperature, num_samples=1, generator=None):
        seen.extend(tok.decode(p) for p in prompts)
        texts = [f"```python\n{ex.reference.get('code', 'pass')}\n```" if i % 2 else "nothing" for i, ex in
                 enumerate(train_order[:len(prompts)])]
        return type("G", (), dict(tokens=[tok(t, add_special_tokens=False)["input_ids"] for t in texts]))

    train_order = [examples[s["key"]] for s in samples]
    monkeypatch.setattr(rerest, "sample", fake_sample)
    monkeypatch.setattr(rerest, "stop_token_ids", lambda tok, model: [tok.eos_token_id])
    cfg = parse_config(rerest.Config, ["--reflections-per-problem", "2"])
    s = rerest.Setup(cfg, one_process, tmp_path, task, train, [], None, examples, tok, None, None, "stub")
    rows = rerest.reflect(s, samples, None, "stub", "stub")
    assert len(rows) == 6
    for s in samples:
        assert any(s["feedback"] in p for p in seen)
    for r in rows:
        assert r["ok"] == task.check(r["text"], examples[r["id"]]).ok


def test_dpo_pairs_a_failed_sample_with_its_own_correction_else_a_passing_sample():
    """p1: one failure with its own passing correction, two without (not corrected; correction failed) that
    fall back to p1's passing samples in turn. p2: every failure corrected but one, which has no passing
    sample to fall back on (another sample's correction is not a fallback). p3: failures with neither."""
    def s(p, j, ok):
        return dict(key=p, j=j, ok=ok, text=f"{p}/{j}")

    def fix(p, j, ok=True):        # a reflect() row: its key is the failed sample's
        return dict(key=f"{p}/{j}", id=p, ok=ok, text=f"fix {p}/{j}")

    samples = [s("p1", 0, False), s("p1", 1, False), s("p1", 2, False), s("p1", 3, True), s("p1", 4, True),
               s("p2", 0, False), s("p2", 1, False), s("p2", 2, False),
               s("p3", 0, False), s("p3", 1, False), s("p4", 0, True)]
    reflections = [fix("p1", 0), fix("p1", 2, ok=False), fix("p2", 0), fix("p2", 1), fix("p3", 0, ok=False)]
    d_m = [x for x in samples if x["ok"]]
    d_r = [r for r in reflections if r["ok"]]
    pairs, counts = rerest.dpo_pairs(samples, d_m, d_r)
    assert [(c["text"], r["text"]) for c, r in pairs] == [
        ("fix p1/0", "p1/0"), ("p1/3", "p1/1"), ("p1/4", "p1/2"), ("fix p2/0", "p2/0"), ("fix p2/1", "p2/1")]
    assert counts == dict(pairs=5, own_correction=3, fallback=2, unpaired=3)
    assert all(not r["ok"] and c["ok"] for c, r in pairs)


def test_report_intervals_and_mcnemar_equal_hand_computations():
    """10 test problems. base solves 1; self-training 9 (lost 1, gained 9: p = 2 * (1 + 10) / 2^10); Re-ReST 7
    (Wilson [39.7%, 89.2%]; lost 1, gained 7: p = 2 * (1 + 8) / 2^8, within noise); DPO had no data."""
    keys = [f"mbpp-{i}" for i in range(10)]
    solved = lambda ids: {k: i in ids for i, k in enumerate(keys)}  # noqa: E731
    rows = {"base": dict(items=solved({0}), time=60.0), "self-training": dict(items=solved(range(1, 10)), time=120.0),
            "Re-ReST": dict(items=solved(range(1, 8)), time=180.0, folder="m"),
            "DPO": dict(items=None, time=30.0, note="no training data")}
    sizes = {"self-training": (5, 0), "Re-ReST": (5, 3), "DPO": (5, 3)}
    dpo = dict(pairs=4, own_correction=3, fallback=1, unpaired=2)
    cfg = parse_config(rerest.Config, ["--task", "mbpp", "--data-dir", "/real/data"])
    text, table, summary = rerest_report(cfg, rows, sizes, 500, dpo)
    assert "pass@1 [95% CI] on 10 of 500 MBPP test problems" in table.splitlines()[0]
    assert "10 of 500 MBPP test problems, a subset" in text
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert lines["base"].startswith("| base | 10.0% [1.8, 40.4] | - | - | - | 1.0 min |")
    assert "| self-training | 90.0% [59.6, 98.2] | +80.0 pts, p = 0.0215 | 5 | 0 |" in lines["self-training"]
    assert "| Re-ReST | 70.0% [39.7, 89.2] | +60.0 pts, p = 0.0703, within noise | 5 | 3 |" in lines["Re-ReST"]
    assert "| DPO | - | - | 5 | 3 |" in lines["DPO"]
    assert "Re-ReST vs base: +60.0 pts (gained 7, lost 1; McNemar p = 0.0703, within noise (p >= 0.05))" in text
    assert "self-training vs base: +80.0 pts (gained 9, lost 1; McNemar p = 0.0215, significant at 5%)" in text
    assert ("DPO pairs: 4, the failed sample rejected in each; chosen: its own passing correction from D_R in 3, "
            "another passing sample of its problem from D_M (no correction passed) in 1. 2 failed samples had "
            "neither") in text

    got = json.loads(json.dumps(summary))          # what report.json holds
    assert got["test"] == dict(n=10, split_size=500, task="mbpp") and got["dpo_pairs"] == dpo
    r = got["rows"]["Re-ReST"]["pass1"]
    assert (r["k"], r["n"], r["pass1"]) == (7, 10, 0.7)
    assert r["interval"] == pytest.approx([0.3968, 0.8922], abs=5e-5)
    assert r["change"] == dict(n=10, change=pytest.approx(0.6), lost=1, gained=7, p_value=18 / 256,
                               verdict="within noise (p >= 0.05)")
    assert got["rows"]["self-training"]["pass1"]["change"]["p_value"] == 22 / 1024
    assert "change" not in got["rows"]["base"]["pass1"] and got["rows"]["DPO"]["pass1"] is None
    assert got["rows"]["Re-ReST"]["items"] == rows["Re-ReST"]["items"]

    # Self-consistency gets its own interval and change from base's self-consistency; the whole split is said so.
    rows = {"base": dict(items=solved({0}), sc_items=solved(range(5)), time=60.0),
            "Re-ReST": dict(items=solved({0}), sc_items=solved(range(10)), time=60.0)}
    cfg = parse_config(rerest.Config, ["--self-consistency", "3", "--data-dir", "/real/data"])
    text, table, summary = rerest_report(cfg, rows, {}, 10)
    assert "10 of 10 MBPP test problems, the whole split" in text and "not a blind test-time method" in text
    assert "| Re-ReST | 10.0% [1.8, 40.4] | +0.0 pts, p = 1, within noise | 100.0% [72.2, 100.0] | " \
           "+50.0 pts, p = 0.0625, within noise |" in table
    assert summary["rows"]["Re-ReST"]["sc"]["change"]["p_value"] == 2 / 32

    # MBPP's own tests alone (EvalPlus's base column) beside visible plus hidden, paired with base's the same way.
    rows = {"base": dict(items=solved({0}), base_items=solved({0, 1}), time=60.0),
            "Re-ReST": dict(items=solved({0}), base_items=solved(range(6)), time=60.0)}
    cfg = parse_config(rerest.Config, ["--data-dir", "/real/data"])
    text, table, summary = rerest_report(cfg, rows, {}, 10)
    assert "pass@1 [95% CI], MBPP's own tests only" in table.splitlines()[0]
    assert "| Re-ReST | 10.0% [1.8, 40.4] | +0.0 pts, p = 1, within noise | 60.0% [31.3, 83.2] | " \
           "+40.0 pts, p = 0.125, within noise |" in table            # gained 4, lost 0: 2 / 2^4
    assert summary["rows"]["Re-ReST"]["pass1_base"]["k"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_tiny_end_to_end_prints_the_table(tmp_path, tiny_chat, nproc):
    out = tmp_path / "run"
    args = [f"--model={tiny_chat}", "--task=mbpp", f"--out={out}", "--k=2", "--train-size=4", "--eval-size=4",
            "--max-completion-length=16", "--dpo", "--train-reflector", "--self-consistency=2", "--device=cpu",
            "--batch-size=2", "--no-bf16"]
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "rerest.py")]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "rerest.py")]
    done = subprocess.run(cmd + args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("| base |", "| self-training |", "| Re-ReST |", "| Re-ReST + trained reflector |", "| DPO |"):
        assert row in done.stdout
    assert "self-consistency 2" in done.stdout and list(out.glob("sc-base-*.jsonl"))
    from data import get_task
    # The run's environment (ENV) leaves $RRR_DATA_DIR out, so it scored the offline sample's split.
    split = len(get_task("mbpp").load("test", data_dir=None))
    report = (out / "report.md").read_text()
    assert f"4 of {split} MBPP test problems, a subset" in report and "exact two-sided McNemar test" in report
    summary = json.loads((out / "report.json").read_text())
    assert summary["test"] == dict(n=4, split_size=split, task="mbpp")
    assert summary["config"]["model"] == str(tiny_chat) and summary["config"]["out"] == str(out.resolve())
    # Defaults applied before the settings are recorded: a tiny model is not checkpointed; the device used.
    assert summary["config"]["gradient_checkpointing"] is False and summary["config"]["device"] == "cpu"
    assert all(r["pass1"] is None or len(r["items"]) == 4 for r in summary["rows"].values())
    # The column of MBPP's own tests alone: each answer checked again with the visible tests only.
    from verifiers import check_code_batch
    assert "MBPP's own tests only" in done.stdout
    answers = read_jsonl(next(out.glob("eval-base-*.jsonl")))
    tests = {ex.id: ex.reference for ex in get_task("mbpp").load("test", data_dir=None)}
    alone = check_code_batch([(a["text"], tests[a["key"]]["tests"], tests[a["key"]]["setup"]) for a in answers])
    assert summary["rows"]["base"]["base_items"] == {a["key"]: v.ok for a, v in zip(answers, alone)}
    samples = read_jsonl(next(out.glob("samples-*.jsonl")))
    dpo = summary["dpo_pairs"]
    assert dpo["own_correction"] + dpo["fallback"] == dpo["pairs"]
    assert dpo["pairs"] + dpo["unpaired"] == sum(not s["ok"] for s in samples)
    # A second run with the same flags redoes nothing: every stage comes from the cache.
    again = subprocess.run(cmd[:1] + [str(REPO / "rerest.py")] + args, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "sample + verify:" not in again.stderr
    assert len(samples) == 4 * 2


@pytest.mark.slow
def test_warm_start_is_the_base_model_and_the_report_says_so(tmp_path, tiny_chat):
    """--warm-start N: every row starts from warmstart.py's model (built here, in a cache of the test's
    own), the report says it is a labelled warm start, and config records both."""
    out = tmp_path / "run"
    args = [f"--model={tiny_chat}", "--task=countdown_easy", "--warm-start=4", f"--out={out}", "--k=1",
            "--train-size=2", "--eval-size=2", "--max-completion-length=8", "--batch-size=2", "--no-bf16"]
    done = subprocess.run([sys.executable, str(REPO / "rerest.py")] + args, capture_output=True, text=True,
                          env=dict(ENV, RRR_CACHE=str(tmp_path / "cache")), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((out / "report.json").read_text())["config"]
    warm = tmp_path / "cache" / "warm-start"
    assert config["warm_start"] == 4 and Path(config["model"]).parent == warm
    assert json.loads((Path(config["model"]) / "warm_start.json").read_text())["base_model"] == str(tiny_chat)
    assert "labelled warm start of 4 solver-written answers" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--task", "nope"], "invalid choice"),
    (["--k", "0"], "--k must be at least 1"),
    (["--task", "countdown", "--self-consistency", "3"], "needs --task mbpp"),
    (["--data-dir", "/no/such/folder"], "does not exist"),
    (["--model", "/nonexistent"], "error: no such folder: /nonexistent"),
    (["--save-total-limit", "0"], "--save-total-limit must be at least 1"),
    (["--self-consistency", "-2"], "--self-consistency must be at least 0"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, extra, message):
    done = subprocess.run([sys.executable, str(REPO / "rerest.py"), f"--out={tmp_path / 'x'}"] + extra, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists(), done.stderr


def test_require_isolation_refuses_without_bubblewrap_and_writes_nothing(tmp_path):
    env = dict(ENV, PATH=str(tmp_path))          # no bwrap on the PATH
    done = subprocess.run([sys.executable, str(REPO / "rerest.py"), f"--out={tmp_path / 'x'}", "--require-isolation"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bubblewrap is not installed" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
