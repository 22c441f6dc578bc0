"""grpo.py against hand computations, a second implementation, and a 2-process run."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo import group_advantages, objective_share, packed_logprobs, policy_loss, zero_variance_fraction
from finetune import span_mask, token_logprobs
from model import right_pad
from sampler import generate
from tiny import REPO, tiny_model


def test_group_advantages_by_hand():
    r = torch.tensor([1., 0., 0., 1., 1., 1., 1., 1., 0., 0., 1., 0.])
    std1 = math.sqrt((4 * 0.25) / 3)                     # Bessel: sum of squares / (G - 1)
    a = group_advantages(r, 4, "group")
    assert torch.allclose(a[:4], torch.tensor([.5, -.5, -.5, .5]) / (std1 + 1e-4))
    assert torch.equal(a[4:8], torch.zeros(4))            # all equal: exactly zero
    m3 = 0.25
    std3 = math.sqrt((3 * m3 ** 2 + (1 - m3) ** 2) / 3)
    assert torch.allclose(a[8:], (torch.tensor([0., 0., 1., 0.]) - m3) / (std3 + 1e-4))
    batch_std = r.std().item()
    b = group_advantages(r, 4, "batch")
    assert torch.allclose(b[:4], torch.tensor([.5, -.5, -.5, .5]) / (batch_std + 1e-4))
    n = group_advantages(r, 4, "none")
    assert torch.allclose(n[8:], torch.tensor([-.25, -.25, .75, -.25]))
    assert torch.equal(group_advantages(r, 1), torch.zeros(12))
    # Equal within float noise counts as equal (pitfall 9).
    assert torch.equal(group_advantages(torch.tensor([.3, .3 + 1e-9, .3, .3]), 4), torch.zeros(4))
    assert zero_variance_fraction(r, 4) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        group_advantages(r, 5)


def reference_loss(lp, old, adv, mask, ref, beta, eps_lo, eps_hi, loss_type, max_len, total):
    """Plain-Python loops over the formula."""
    B, T = len(lp), len(lp[0])
    rows, all_sum, count = [], 0.0, 0
    for b in range(B):
        row_sum, row_n = 0.0, 0
        for t in range(T):
            if not mask[b][t]:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
            value = -min(ratio * adv[b], clipped * adv[b])
            if beta:
                d = ref[b][t] - lp[b][t]
                value += beta * (math.exp(d) - d - 1)
            row_sum += value
            row_n += 1
        rows.append(row_sum / max(row_n, 1))
        all_sum += row_sum
        count += row_n
    return {"grpo": sum(rows) / B, "bnpo": all_sum / max(count, 1),
            "dr_grpo": all_sum / (B * max_len), "dapo": all_sum / (total or count)}[loss_type]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_policy_loss_equals_hand_computation(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + (torch.rand(B, T, generator=g) - 0.5) * 0.8     # ratios from ~0.67 to ~1.5: both clips hit
    ref = lp + (torch.rand(B, T, generator=g) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.0, -1.1])
    mask = span_mask([(1, 5), (2, 7), (0, 0), (3, 4)], T)
    loss, stats = policy_loss(lp, old, adv, mask, ref_logprobs=ref, beta=beta, epsilon=0.2,
                              epsilon_high=0.28, loss_type=loss_type, max_completion_length=10,
                              total_tokens=20)
    expected = reference_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), beta,
                              0.2, 0.28, loss_type, 10, 20)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert stats["tokens"] == 10
    assert 0 < stats["clip_sum"] < stats["tokens"]


def test_objective_share_by_hand():
    # A micro-batch of 3 rows and 5 trained tokens, on a rank with 20 trained tokens, of 12 rows over 2 ranks.
    assert objective_share("dapo", 3, 12, 5, 20, 2) == 1.0
    assert objective_share("grpo", 3, 12, 5, 20, 2) == 3 / 12
    assert objective_share("dr_grpo", 3, 12, 5, 20, 2) == 3 / 12
    assert objective_share("bnpo", 3, 12, 5, 20, 2) == 5 / 20 / 2
    assert objective_share("bnpo", 3, 12, 0, 0, 1) == 0.0      # a rank with nothing trained
    with pytest.raises(ValueError):
        objective_share("nope", 3, 12, 5, 20, 2)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_shares_of_micro_batches_and_ranks_add_up_to_the_whole_batch(loss_type):
    """The contract of objective_share: over 2 ranks split into micro-batches, the sum of share x loss
    equals the hand-computed objective of the whole batch (reference_loss on the whole batch; for bnpo,
    each rank's token mean, averaged over the ranks)."""
    g = torch.Generator().manual_seed(11)
    B, T = 7, 6
    lp = -torch.rand(B, T, generator=g) * 3
    old = lp + (torch.rand(B, T, generator=g) - 0.5) * 0.8
    adv = torch.randn(B, generator=g)
    mask = span_mask([(1, 5), (2, 6), (0, 0), (3, 4), (1, 6), (4, 6), (2, 3)], T)
    ranks = [[[0, 1], [2, 3]], [[4], [5, 6]]]                     # rank -> its micro-batches (rows)
    total_rows, total_tokens = B, mask.sum().item()
    got = 0.0
    for micro in ranks:
        local_tokens = sum(mask[rows].sum().item() for rows in micro)
        for rows in micro:
            loss, _ = policy_loss(lp[rows], old[rows], adv[rows], mask[rows], loss_type=loss_type,
                                  max_completion_length=10, total_tokens=total_tokens)
            got += loss.item() * objective_share(loss_type, len(rows), total_rows, mask[rows].sum().item(),
                                                 local_tokens, len(ranks))
    args = (lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), None, 0.0, 0.2, 0.2)
    if loss_type == "bnpo":
        mine = [[r for rows in micro for r in rows] for micro in ranks]
        expected = sum(reference_loss(*[[x[r] for r in rs] for x in args[:4]], *args[4:], "bnpo", 10, None)
                       for rs in mine) / len(ranks)
    else:
        expected = reference_loss(*args, loss_type, 10, total_tokens)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_right_pad_lists_and_tensors():
    assert right_pad([[5, 6, 7], [8], []]).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert right_pad([[]]).shape == (1, 1)
    x = torch.tensor([0.5, -1.0], requires_grad=True)
    padded = right_pad([x, torch.tensor([2.0])])
    assert padded.tolist() == [[0.5, -1.0], [2.0, 0.0]] and padded.requires_grad


def test_span_mask_from_spans_not_ids():
    m = span_mask([(2, 5), (0, 1)], 6)
    assert m.tolist() == [[0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]


def logits_to_logprobs(logits, ids):
    lp = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(lp, (1, 0))


def test_gradient_only_at_masked_positions_including_span_end():
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    spans = [(3, 6), (1, 9), (4, 5)]                  # trained tokens; logits at t-1 predict token t
    mask = span_mask(spans, T)
    lp = logits_to_logprobs(logits, ids)
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor([1.0, -2.0, 0.5]), mask, loss_type="dapo")
    loss.backward()
    grad_norm = logits.grad.abs().sum(-1)            # (B, T)
    for b, (s, e) in enumerate(spans):
        for t in range(T):
            predicts_trained = s <= t + 1 < e
            assert (grad_norm[b, t] > 0) == predicts_trained, (b, t)
        assert grad_norm[b, e - 2] > 0               # the logit predicting the span's last token


def test_loss_is_zero_at_the_first_step_but_its_gradient_is_not():
    """Pitfall 10: with old == current log-probs every ratio is 1, so a row's token mean is its
    advantage, and a group's advantages sum to 0: the loss is 0 (by hand) while the gradient is not."""
    g = torch.Generator().manual_seed(2)
    B, T, V = 4, 6, 13
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    lp = logits_to_logprobs(logits, ids)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    assert adv.sum().abs() < 1e-6
    loss, stats = policy_loss(lp, lp.detach(), adv, span_mask([(1, 4)] * B, T), loss_type="grpo")
    assert abs(loss.item()) < 1e-6 and stats["ratio_sum"] == pytest.approx(stats["tokens"])
    loss.backward()
    assert logits.grad.abs().sum() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_token_logprobs_equal_full_logits(arch):
    model = tiny_model(arch=arch, seed=2)
    g = torch.Generator().manual_seed(3)
    lengths = [12, 7, 10]
    ids = torch.zeros(3, 12, dtype=torch.long)
    attn = torch.zeros(3, 12, dtype=torch.long)
    for b, n in enumerate(lengths):                   # right padding, pad id 2 == eos id in tiny models
        ids[b, :n] = torch.randint(3, 256, (n,), generator=g)
        ids[b, n:] = 2
        attn[b, :n] = 1
    mask = span_mask([(4, 12), (1, 7), (5, 6)], 12)
    got = token_logprobs(model, ids, attn, mask, chunk_size=3)
    with torch.no_grad():
        full = logits_to_logprobs(model(ids, attention_mask=attn).logits.float(), ids)
    assert torch.allclose(got, full * mask, atol=1e-5)
    assert torch.equal(got[mask == 0], torch.zeros(int((mask == 0).sum())))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_logprobs_equal_separate_sequences_with_gradients(arch):
    """Each prefix computed once for its continuations: values and parameter gradients must equal those
    of every prefix + continuation run as its own sequence."""
    model = tiny_model(arch=arch, seed=5)
    g = torch.Generator().manual_seed(6)
    rand = lambda n: torch.randint(3, 256, (n,), generator=g).tolist()  # noqa: E731
    groups = [(rand(9), [rand(4), rand(1), rand(6)]), (rand(3), [rand(2), [], rand(5)]), (rand(12), [rand(3)])]
    weights = torch.randn(sum(len(c) for _, cs in groups for c in cs), generator=g)

    model.zero_grad()
    packed = packed_logprobs(model, groups, chunk_size=5)
    (torch.cat(packed) * weights).sum().backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    separate = []
    for prefix, conts in groups:
        for c in conts:
            logits = model(torch.tensor([prefix + c])).logits[0].float()
            lp = logits.log_softmax(-1)[len(prefix) - 1:-1].gather(-1, torch.tensor(c, dtype=torch.long)[:, None])[:, 0]
            separate.append(lp)
    (torch.cat(separate) * weights).sum().backward()
    assert [len(x) for x in packed] == [len(x) for x in separate]
    assert torch.allclose(torch.cat(packed), torch.cat(separate).detach(), atol=1e-5)
    for a, b in zip(packed_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4 * b.abs().max().item())


def toy_batch(seed=0):
    model = tiny_model(vocab_size=32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 10
    ids = torch.randint(3, 32, (B, T), generator=g)
    spans = [(2, 10), (5, 6), (1, 4), (3, 9), (6, 8), (2, 3)]   # very different token counts
    return model, ids, torch.ones(B, T, dtype=torch.long), span_mask(spans, T), torch.randn(B, generator=g)


def grads_of(model, ids, attn, mask, adv, rows, total, loss_type="dapo"):
    model.zero_grad()
    for part in rows:
        lp = token_logprobs(model, ids[part], attn[part], mask[part])
        loss, _ = policy_loss(lp, lp.detach(), adv[part], mask[part], loss_type=loss_type, total_tokens=total)
        loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_dapo_gradient_independent_of_micro_batching():
    model, ids, attn, mask, adv = toy_batch()
    total = mask.sum().item()
    whole = grads_of(model, ids, attn, mask, adv, [list(range(6))], total)
    split = grads_of(model, ids, attn, mask, adv, [[0, 1], [2, 3, 4], [5]], total)
    assert torch.allclose(whole, split, atol=1e-6)
    # The common bug (pitfall 1): normalising each micro-batch by its own token count.
    naive = grads_of(model, ids, attn, mask, adv, [[0, 1], [2, 3, 4], [5]], None, loss_type="bnpo")
    assert not torch.allclose(whole, naive / 3, atol=1e-4)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def packed_toy_groups():
    """Three groups (shared prefix, continuations) and an advantage per continuation."""
    g = torch.Generator().manual_seed(9)
    rand = lambda n: torch.randint(3, 256, (n,), generator=g).tolist()  # noqa: E731
    groups = [(rand(7), [rand(3), rand(5)]), (rand(4), [rand(2), rand(6), rand(1)]), (rand(10), [rand(4), rand(2)])]
    return groups, torch.randn(7, generator=g)


def run_two_ranks(tmp_path, mode):
    out = tmp_path / f"{mode}.pt"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(Path(__file__).with_name("grpo_two_ranks.py")), mode, str(out)]
    done = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_dapo_gradient_same_over_two_ranks(tmp_path):
    model, ids, attn, mask, adv = toy_batch()
    whole = grads_of(model, ids, attn, mask, adv, [list(range(6))], mask.sum().item())
    assert torch.allclose(run_two_ranks(tmp_path, "plain"), whole, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp", "fsdp-checkpointing"])
def test_fsdp_packed_gradient_over_two_ranks_equals_plain_sequences(tmp_path, mode):
    """rrr.py's training path (FSDP2 over 2 ranks, shared prefixes computed once; with activation
    checkpointing, which must put back the KV cache around its recompute) against one ordinary model
    that runs every prefix + continuation as its own sequence."""
    groups, adv = packed_toy_groups()
    model = tiny_model(seed=8).train()
    values = []
    for prefix, conts in groups:
        for c in conts:
            logits = model(torch.tensor([prefix + c])).logits[0].float()
            values.append(logits.log_softmax(-1)[len(prefix) - 1:-1].gather(-1, torch.tensor(c)[:, None])[:, 0])
    width = max(len(v) for v in values)
    lp = torch.stack([torch.nn.functional.pad(v, (0, width - len(v))) for v in values])
    mask = torch.stack([torch.nn.functional.pad(torch.ones(len(v)), (0, width - len(v))) for v in values])
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, total_tokens=mask.sum().item())
    loss.backward()
    whole = torch.cat([p.grad.flatten() for p in model.parameters()])
    got = run_two_ranks(tmp_path, mode)
    assert torch.allclose(got, whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())


def test_kl_gradient_pulls_toward_reference():
    """Sign check (pitfall 7): descending beta * k3 on tokens sampled from the policy lowers the
    exact KL(policy || reference)."""
    g = torch.Generator().manual_seed(4)
    V = 8
    logits = torch.randn(V, generator=g, requires_grad=True)
    ref_lp = torch.randn(V, generator=g).log_softmax(-1)

    def exact_kl():
        p = logits.log_softmax(-1)
        return (p.exp() * (p - ref_lp)).sum().item()

    before = exact_kl()
    for _ in range(60):
        tokens = torch.multinomial(logits.detach().softmax(-1), 256, replacement=True, generator=g)
        lp = logits.log_softmax(-1)[tokens][None]                        # (1, 256)
        loss, stats = policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 256),
                                  ref_logprobs=ref_lp[tokens][None], beta=1.0)
        logits.grad = None
        loss.backward()
        with torch.no_grad():
            logits -= 1.0 * logits.grad
    assert stats["kl_sum"] >= 0
    assert exact_kl() < 0.3 * before, (before, exact_kl())


@pytest.mark.slow
def test_learns_a_toy_reward():
    """Reward 1 when the sampled continuation contains token 7: mean reward must rise clearly."""
    torch.manual_seed(0)
    model = tiny_model(vocab_size=16, seed=7).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen_rng = torch.Generator().manual_seed(0)
    prompts = [[3, 4, 5], [6, 8], [9, 10, 11, 12]]
    G, N = 8, 5

    def rollout():
        gen = generate(model, prompts, max_new_tokens=N, num_samples=G, generator=gen_rng)
        rewards = torch.tensor([float(7 in t) for t in gen.tokens])
        return gen, rewards

    first = torch.stack([rollout()[1].mean() for _ in range(5)]).mean().item()
    for _ in range(40):
        gen, rewards = rollout()
        adv = group_advantages(rewards, G)
        seqs = [prompts[r // G] + t for r, t in enumerate(gen.tokens)]
        T = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
        attn = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        mask = span_mask([(len(prompts[r // G]), len(s)) for r, s in enumerate(seqs)], T)
        lp = token_logprobs(model, ids, attn, mask)
        loss, _ = policy_loss(lp, lp.detach(), adv, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = torch.stack([rollout()[1].mean() for _ in range(5)]).mean().item()
    assert last > first + 0.3 and last > 0.8, (first, last)
