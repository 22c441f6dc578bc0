"""rerest.py: the SFT and DPO losses against hand computations, LoRA against the plain model, the
reflector's prompt and D_R, and a tiny end-to-end run on 1 and 2 processes."""

import math
import subprocess
import sys

import pytest
import torch

import parallel as par
import rerest
from grpo import span_mask, token_logprobs
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
    loss = rerest.sft_loss(token_logprobs(model, ids, attn, mask), mask, total_tokens=8)
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)
    hand = -sum(logp[b, t - 1, ids[b, t]].item() for b, (s, e) in enumerate(spans) for t in range(s, e)) / 8
    assert loss.item() == pytest.approx(hand, rel=1e-5)

    logits = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    rerest.sft_loss(logits_to_logprobs(logits, ids), mask, 8).backward()
    for b, (s, e) in enumerate(spans):
        for t in range(9):
            assert (logits.grad[b, t].abs().sum() > 0) == (s <= t + 1 < e), (b, t)


def test_dpo_loss_equals_hand_computation():
    c, r = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    got = rerest.dpo_loss(c, r, rc, rr, beta=0.5)
    for i in range(2):
        margin = 0.5 * ((c[i] - rc[i]) - (r[i] - rr[i])).item()
        assert got[i].item() == pytest.approx(math.log(1 + math.exp(-margin)), rel=1e-6)


def test_lora_starts_as_identity_and_merges_exactly(one_process):
    model = tiny_model(vocab_size=64, seed=2)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    rerest.add_lora(model, r=4, alpha=8, seed=0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.5)
        adapted = model(ids).logits
    assert not torch.allclose(adapted, before, atol=1e-3)
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    merged = tiny_model(vocab_size=64, seed=99)
    missing, unexpected = merged.load_state_dict(rerest.merged_state(model), strict=False)
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
    real = rerest.token_logprobs

    def spy(model, *args, **kwargs):
        seen.append({(type(p).__name__, p.dtype, p.requires_grad) for p in model.parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(rerest, "token_logprobs", spy)
    data = [([5, 6, 7], [8, 9], [10, 11, 12])] * 2
    cfg = parse_config(rerest.Config, ["--epochs", "1", "--batch-size", "2", "--micro-batch-size", "2",
                                       "--lora-r", "0", "--bf16"])
    rerest.train_model(cfg, one_process, str(tiny_chat), data, tmp_path / "m", "dpo")
    assert seen[0] == {("DTensor", torch.float32, True)}          # the trained model
    assert seen[1] == {("DTensor", torch.bfloat16, False)}        # the reference


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

    def fake_sample(model, tok_, prompts, cfg, temperature, num_samples=1, seed=0):
        seen.extend(tok.decode(p) for p in prompts)
        texts = [f"```python\n{ex.reference.get('code', 'pass')}\n```" if i % 2 else "nothing" for i, ex in
                 enumerate(train_order[:len(prompts)])]
        return type("G", (), dict(tokens=[tok(t, add_special_tokens=False)["input_ids"] for t in texts]))

    train_order = [examples[s["key"]] for s in samples]
    monkeypatch.setattr(rerest, "sample", fake_sample)
    cfg = parse_config(rerest.Config, ["--reflections-per-problem", "2"])
    rows = rerest.reflect(cfg, one_process, None, tok, task, examples, samples, tmp_path, "stub", "stub")
    assert len(rows) == 6
    for s in samples:
        assert any(s["feedback"] in p for p in seen)
    for r in rows:
        assert r["ok"] == task.check(r["text"], examples[r["id"]]).ok


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_tiny_end_to_end_prints_the_table(tmp_path, tiny_chat, nproc):
    out = tmp_path / "run"
    args = [f"--model={tiny_chat}", "--task=mbpp", f"--out={out}", "--k=2", "--train-size=4", "--eval-size=4",
            "--max-completion-length=16", "--dpo", "--train-reflector", "--self-consistency=2", "--device=cpu",
            "--batch-size=2"]
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
    assert (out / "report.md").exists()
    # A second run with the same flags redoes nothing: every stage comes from the cache.
    again = subprocess.run(cmd[:1] + [str(REPO / "rerest.py")] + args, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "sample + verify:" not in again.stderr
    samples = read_jsonl(next(out.glob("samples-*.jsonl")))
    assert len(samples) == 4 * 2


@pytest.mark.parametrize("extra, message", [
    (["--task", "nope"], "invalid choice"),
    (["--k", "0"], "--k must be at least 1"),
    (["--task", "countdown", "--self-consistency", "3"], "needs --task mbpp"),
    (["--data-dir", "/no/such/folder"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, extra, message):
    done = subprocess.run([sys.executable, str(REPO / "rerest.py"), f"--out={tmp_path / 'x'}"] + extra, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_require_isolation_refuses_without_bubblewrap_and_writes_nothing(tmp_path):
    env = dict(ENV, PATH=str(tmp_path))          # no bwrap on the PATH
    done = subprocess.run([sys.executable, str(REPO / "rerest.py"), f"--out={tmp_path / 'x'}", "--require-isolation"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "bubblewrap is not installed" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
