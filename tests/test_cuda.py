"""The CUDA path: the sampler in bf16 against HF `generate` and a teacher-forced HF forward, the same
samples with and without CUDA graphs, host syncs while decoding counted by CUDA itself, `rrr.py
--device cuda --bf16` on 1 GPU (and 2 when there are) against a 1-process replay of its episodes, and
kill + resume on CUDA giving bit-identical weights.

Skipped without CUDA. With RRR_TEST_CUDA_ON_CPU=1 the same tests run on the CPU with tiny shapes and
fp32 instead of bf16 (and the 2-rank run on 2 gloo processes): that only exercises this module's code
on a machine without a GPU; it says nothing about CUDA kernels or bf16.
"""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import parallel as par
import rrr
from runs import parse_config, read_jsonl
from sampler import fuse_projections, generate
from test_rrr import common_args, final_weights, kill_and_resume, replay, run_rrr
from tiny import save_tiny_chat_model

ON_CPU = os.environ.get("RRR_TEST_CUDA_ON_CPU") == "1"
pytestmark = pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()),
                                reason="needs CUDA (RRR_TEST_CUDA_ON_CPU=1 runs it on the CPU, fp32)")
DEVICE = "cpu" if ON_CPU else "cuda"
DTYPE = torch.float32 if ON_CPU else torch.bfloat16
PRECISION = "--no-bf16" if ON_CPU else "--bf16"
# Real-ish widths on a GPU. Init std: tiny.py's 0.2 keeps a 64-wide model from repeating one token,
# but at width 1536 it makes the bf16 forward chaotic (two correct implementations disagreed by up to
# 2.8 nats, measured in bf16 on a CPU); HF's own 0.02 is not degenerate at this width (22-24 distinct
# tokens in 24 greedy ones) and well conditioned.
SHAPE = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512) if ON_CPU else
         dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4, num_attention_heads=12,
              num_key_value_heads=2, vocab_size=151936))
INIT_STD = 0.2 if ON_CPU else 0.02
NEW = 24
# The tiny chat model never earns a reward, so the KL to the reference is the whole loss. Stronger than
# test_rrr's defaults: weight decay moves the weights x0.9 at step 1 and beta 1 makes the step-2
# gradients large against bf16 noise.
TRAINING = dict(weight_decay=100.0, beta=1.0)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"), seed=3)


def qwen2_model():
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPE, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=4096)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, INIT_STD)
    return model.eval()


def teacher_forced_logits(model, prompt, tokens):
    """fp32 copies of HF's logits predicting each of `tokens` after `prompt`, one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device=DEVICE)).logits
    return logits[0, len(prompt) - 1:-1].float()


def tie_tolerance(logits):
    """Per row, what two correct implementations may disagree by: in bf16 the logits themselves are
    rounded to 8 significant bits, so some units in the last place at the row's largest |logit| (up to
    3 measured in bf16 on a CPU, where the sampler's and HF's kernels differ too)."""
    if DTYPE == torch.float32:
        return torch.full(logits.shape[:1], 1e-4, device=logits.device)
    ulp = 2.0 ** (torch.floor(torch.log2(logits.abs().amax(-1))) - 7)
    return 8 * ulp


def test_sampler_greedy_equals_hf_generate_on_mixed_length_prompts():
    """6 prompts of 5..60 tokens, batched through the sampler, each alone through HF generate.
    fp32: every prompt identical. bf16: random-init logits over a 152k vocabulary have a top-2 pair
    within one bf16 unit at 10-16% of positions, so two correct kernels part in most prompts (2 to 4
    of 6 were identical, measured in bf16 on a CPU over 5 seeds): each prompt must agree up to its first
    near-tie, with a quarter of all tokens agreed at least, and every token the sampler chose must be
    an argmax of HF's teacher-forced logits up to that tolerance."""
    model = fuse_projections(qwen2_model())
    g = torch.Generator().manual_seed(1)
    lengths = [5, 16, 27, 38, 49, 60]
    prompts = [torch.randint(3, SHAPE["vocab_size"], (k,), generator=g).tolist() for k in lengths]
    ours = generate(model, prompts, max_new_tokens=NEW, temperature=0)
    exact = agreed = 0
    for i, p in enumerate(prompts):
        ids = torch.tensor([p], device=DEVICE)
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert len(ours.tokens[i]) == len(hf) == NEW and not ours.finished[i]
        assert len(set(hf)) >= NEW // 2, f"prompt {i}: degenerate reference {hf}"
        j = next((j for j, (a, b) in enumerate(zip(ours.tokens[i], hf)) if a != b), NEW)
        exact, agreed = exact + (j == NEW), agreed + j
        if j < NEW:
            ref = teacher_forced_logits(model, p, hf)
            top2 = ref[j].topk(2).values
            assert DTYPE != torch.float32, f"prompt {i} differs at {j} in fp32"
            assert top2[0] - top2[1] <= tie_tolerance(ref[j:j + 1])[0], (
                f"prompt {i}: first difference at {j}, where HF's top-2 gap is {float(top2[0] - top2[1]):.4f}")
        # Every token the sampler chose, also past a divergence, against HF's forward on that context.
        tf = teacher_forced_logits(model, p, ours.tokens[i])
        chosen = tf.gather(-1, torch.tensor(ours.tokens[i], device=DEVICE)[:, None])[:, 0]
        below = tf.amax(-1) - chosen
        assert (below <= tie_tolerance(tf)).all(), f"prompt {i}: chose tokens {below.max():.4f} below the argmax"
        # Its log-probs (raw logits at temperature 0) against the forward's log_softmax.
        want = tf.log_softmax(-1).gather(-1, torch.tensor(ours.tokens[i], device=DEVICE)[:, None])[:, 0]
        got = torch.tensor(ours.logprobs[i], device=DEVICE)
        tol = tie_tolerance(tf).clamp(min=1e-4 if DTYPE == torch.float32 else 2e-2)
        assert ((got - want).abs() <= tol).all(), f"prompt {i}: log-probs off by {(got - want).abs().max():.4f}"
    assert exact == len(prompts) if DTYPE == torch.float32 else agreed >= len(prompts) * NEW // 4


def stopping_prompts(model, batch, new):
    """Prompts of 150-230 tokens, so the window crosses a 256-slot block, and stop tokens taken from
    an unstopped greedy run, so rows end at different steps and the working batch shrinks."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, SHAPE["vocab_size"], (int(k),), generator=g).tolist()
               for k in torch.randint(150, 231, (batch,), generator=g)]
    free = generate(model, prompts, max_new_tokens=new, temperature=0)
    return prompts, sorted({free.tokens[r][4 + 5 * r] for r in range(batch // 2)})


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32], ids=["compute-dtype", "fp32"])
def test_captured_steps_sample_what_eager_steps_sample(dtype):
    """Same seed, same samples (tokens, log-probs, stops) with and without CUDA graphs, at temperature
    1 with stop tokens, across a window block and several shrinks of the working batch (each a new
    capture), and in a continuation of the kept cache. fp32 takes the memory-efficient attention kernel,
    whose output layout differs from the CPU's."""
    model = fuse_projections(qwen2_model()).to(dtype)
    prompts, stops = stopping_prompts(model, 8, 40)
    runs = []
    for graphs in (False, True):
        first = generate(model, prompts, max_new_tokens=40, num_samples=2, temperature=1.0, stop_token_ids=stops,
                         generator=torch.Generator(DEVICE).manual_seed(0), keep_cache=True, cuda_graphs=graphs)
        second = generate(model, [[5, 6, 7]] * 16, max_new_tokens=12, temperature=1.0, cache=first.cache,
                          generator=torch.Generator(DEVICE).manual_seed(1), cuda_graphs=graphs)
        runs.append([(g.tokens, g.logprobs, g.finished) for g in (first, second)])
    assert runs[0] == runs[1]
    finished = runs[0][0][2]
    assert any(finished) and not all(finished)


@pytest.mark.skipif(ON_CPU, reason="CUDA's own sync detector")
def test_decoding_syncs_once_per_check_by_cuda_count():
    """CUDA's sync debug mode warns at every synchronizing call; while decoding there may be one per
    CHECK_EVERY steps plus a constant (the results; the prefill's own)."""
    import warnings

    from sampler import CHECK_EVERY
    model = fuse_projections(qwen2_model())
    prompts, stops = stopping_prompts(model, 8, 64)
    for new in (16, 64):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, prompts, max_new_tokens=new, num_samples=2, temperature=1.0, stop_token_ids=stops,
                         generator=torch.Generator(DEVICE).manual_seed(0))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= (new - 1) // CHECK_EVERY + 8, [str(w.message)[:120] for w in syncs]


def nprocs():
    # 2 ranks on CPU too under RRR_TEST_CUDA_ON_CPU (gloo), so the torchrun path of this test runs.
    return [1, pytest.param(2, marks=pytest.mark.skipif(
        not ON_CPU and torch.cuda.device_count() < 2, reason="needs 2 GPUs"))]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", nprocs())
def test_rrr_run_equals_one_process_replay(tmp_path, tiny_chat, nproc):
    """2 steps of rrr.py, then the logged episodes replayed through policy.grpo_update (as rrr.py calls it) in this process
    (1 rank): each step's loss and gradient norm, and the exported weights, must match. bf16 compute
    differs with the batch split, hence the tolerances (fp32: those of tests/test_rrr.py)."""
    out = tmp_path / "run"
    args = common_args(tiny_chat, out, device=DEVICE, **TRAINING) + [PRECISION]
    done = run_rrr(args, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[1]["loss"] > 1e-3 and metrics[1]["grad_norm"] > 0.1, metrics[1]
    rel, abs_, atol = (1e-4, 1e-7, 1e-5) if ON_CPU else (2e-2, 1e-4, 1e-3)

    cfg = parse_config(rrr.Config, args)
    assert cfg.bf16 is (not ON_CPU)
    d = par.init_distributed(DEVICE)
    try:
        pol = rrr.load_policy(cfg, d)
        replay(cfg, d, pol, out, metrics, rel=rel, abs=abs_)
        # Adam moves every weight by about lr * sign(gradient) at its first nonzero step, so an element
        # whose gradient is ~0 moves by +-lr on the sign of its rounding error: with ranks summing in
        # another order, a few in a million did (measured on CPU: 15 of 3.2M in bf16, 1 in fp32).
        # A wrong gradient would flip a sizeable fraction.
        exported = final_weights(out)
        off = total = 0
        for name, p in pol.model.named_parameters():
            diff = (par.full_tensor(p.detach()).cpu() - exported[name]).abs()
            off, total = off + int((diff > atol).sum()), total + diff.numel()
            assert diff.max() <= 4 * cfg.learning_rate, name
        assert off <= 1e-4 * total, f"{off} of {total} weights off by more than {atol}"
    finally:
        par.close_distributed()


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(tmp_path, tiny_chat):
    """As tests/test_rrr.py, on the device: killed after its second checkpoint and resumed, the run
    must end with exactly the weights of a run that was never interrupted."""
    extra = dict(steps=5, save_every=1, train_size=6, device=DEVICE, **TRAINING)
    out = kill_and_resume(tmp_path, lambda o: common_args(tiny_chat, o, **extra) + [PRECISION])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert all(m["grad_norm"] > 0 for m in metrics[1:]), metrics       # the weights did move
