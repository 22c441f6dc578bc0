"""The GRPO objective, with advantage only on chosen spans (for RRR: the reflection tokens).

- `group_advantages`: rewards of G samples of the same query -> advantages.
- `packed_logprobs`: log p(token | prefix) of the continuations of shared prefixes, each prefix run once,
  through `head_logprobs`, which never holds the (batch, length, vocab) logits.
- `policy_loss`: clipped surrogate + optional k3 KL to a reference, aggregated as TRL's loss types;
  `objective_share` scales each micro-batch's loss to its share of the whole step's objective.

Masks (B, T) are 1 exactly on trained tokens and are built from spans, never from token ids: a pad id
equal to the EOS id would otherwise mask the EOS that ends a reflection.

"Loss is 0 at the first step" is expected: with one update per batch the ratio is 1 and a group's
advantages sum to zero, so the surrogate's value is ~0 while its gradient is not. Watch the reward.
"""

import torch

from model import pad_ids

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     tol: float = 1e-6, batch_std: float | None = None,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """rewards (B,) with groups as contiguous runs of group_size -> advantages (B,).

    "group": (r - group mean) / (group std + eps); "batch": divide by the std of the whole batch
    (`batch_std` when given: the global batch's, over all ranks; else that of `rewards`);
    "none": r - group mean. std is Bessel-corrected (torch.std). A group whose rewards are all equal
    within `tol` carries no signal and gets exactly 0 (float noise would otherwise be amplified by
    1 / (std + eps)). `valid` (B,) bool: rewards that count; the others (episodes the sandbox could not
    judge) get 0 and are left out of their group's mean and std, as if the group were that much smaller.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"need 1-D rewards whose length {tuple(rewards.shape)} is a multiple of "
                         f"group_size {group_size}")
    rewards = rewards.float()
    if valid is not None and not bool(valid.all()):
        out = torch.zeros_like(rewards)
        std = batch_std if batch_std is not None or scale != "batch" else rewards[valid].std().item()
        for start in range(0, rewards.numel(), group_size):
            rows = torch.arange(start, start + group_size)[valid[start:start + group_size]]
            if len(rows) > 1:
                out[rows] = group_advantages(rewards[rows], len(rows), scale, eps, tol, std)
        return out
    if group_size == 1:
        return torch.zeros_like(rewards)
    groups = rewards.view(-1, group_size)                         # (B / G, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    flat = (groups.max(dim=1).values - groups.min(dim=1).values) <= tol
    return centred.masked_fill(flat[:, None], 0.0).view(-1)


def zero_variance_fraction(rewards: torch.Tensor, group_size: int, tol: float = 1e-6) -> float:
    """Fraction of groups whose rewards are all equal: they teach nothing (all succeed or all fail); 0 of
    no group (a rank that trains none: rrr.py's --dynamic-sampling)."""
    if not rewards.numel():
        return 0.0
    groups = rewards.float().view(-1, group_size)
    return ((groups.max(1).values - groups.min(1).values) <= tol).float().mean().item()


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log p(targets[n] | hidden[n]) through the model's output head: hidden (N, H), targets (N,) -> (N,).

    `chunk_size` rows at a time, each chunk checkpointed, so backward recomputes its (chunk, vocab)
    logits instead of keeping them: peak logits memory is one chunk, whatever the batch (the (batch, length,
    vocab) fp32 logits are the largest tensor of an update: vocabularies hold 50k-150k entries, hidden
    states 0.5k-4k)."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias if getattr(head, "bias", None) is not None else None

    def chunk_logprobs(h, y):
        # The head's product runs in the compute dtype (AMX's bf16 kernels: 2.4x the fp32 head's speed on
        # 4,096 tokens), as the sampler's does; the log-softmax runs in fp32. Against the fp32 model's
        # log-probs, a bf16 body with an fp32 head is off by 0.022 on average (p99 0.12) and with a bf16
        # head by 0.032 (p99 0.15), most of it the body's rounding (BENCHMARKS.md).
        logits = torch.nn.functional.linear(h.to(weight.dtype), weight, bias).float()   # (chunk, vocab)
        # The fused log-softmax + pick of cross_entropy: no (chunk, vocab) log-softmax tensor is kept.
        return -torch.nn.functional.cross_entropy(logits, y, reduction="none")

    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, h, y, use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(h, y))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def packed_logprobs(model, groups: list[tuple[list[int], list[list[int]]]], device=None,
                    chunk_size: int = 1024) -> list[torch.Tensor]:
    """Log-probs of the continuations of shared prefixes, computing each prefix once.

    groups: (prefix, [continuation, ...]) pairs; the G reflections of one failure share its prompt +
    attempt + reflection prompt. A first forward runs the prefixes (right-padded) and keeps their
    keys and values; a second runs every continuation as its own row on a copy of its prefix's cache,
    with position ids that continue where that prefix ends. Gradients flow back through the cache
    into the prefix pass, so this equals running each prefix + continuation on its own, without G
    copies of the prefix in the forward and backward passes. The first token of each continuation is
    predicted from its prefix's last position. Returns one tensor per continuation, in order.
    """
    if any(not prefix for prefix, _ in groups):
        raise ValueError("a continuation needs a non-empty prefix to be predicted from")
    sizes = [len(c) for _, conts in groups for c in conts]
    rows = [(g, c) for g, (_, conts) in enumerate(groups) for c in conts if c]
    if not rows:
        return [torch.zeros(0, device=device) for _ in sizes]
    prefix_ids, prefix_mask = pad_ids([p for p, _ in groups])
    # No logits from the model's own head (head_logprobs computes what is needed): with logits_to_keep=1
    # the head ran on a strided (rows, 1, hidden) slice, which torch multiplied as a batched product
    # over `rows` expanded copies of the weight (8 copies of the head per micro-batch in bench/grpo_step.py).
    no_logits = torch.zeros(0, dtype=torch.long, device=device)
    out = model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device), use_cache=True,
                output_hidden_states=True, logits_to_keep=no_logits)
    cache, prefix_hidden = out.cache, out.hidden_states[-1]                # hidden (groups, P, H)
    owner = torch.tensor([g for g, _ in rows], device=prefix_hidden.device)
    cache.batch_select_indices(owner)                                      # one cache row per continuation
    cont_ids, cont_mask = pad_ids([c for _, c in rows])
    lengths = torch.tensor([len(groups[g][0]) for g, _ in rows])
    positions = lengths[:, None] + torch.arange(cont_ids.shape[1])
    mask = torch.cat([prefix_mask[owner.cpu()], cont_mask], dim=1)         # (rows, P + C): keys to attend
    out = model(input_ids=cont_ids.to(device), attention_mask=mask.to(device),
                position_ids=positions.to(device), cache=cache, output_hidden_states=True,
                logits_to_keep=no_logits)
    cont_hidden = out.hidden_states[-1]                                    # (rows, C, H)
    # Predictor of each continuation token: its prefix's last position, then its own previous token.
    first = prefix_hidden[owner, (lengths - 1).to(owner.device)]           # (rows, H)
    hidden = torch.cat([torch.cat([first[r:r + 1], cont_hidden[r, :len(c) - 1]])
                        for r, (_, c) in enumerate(rows)])
    targets = torch.tensor([t for _, c in rows for t in c], dtype=torch.long, device=hidden.device)
    values = iter(head_logprobs(model, hidden, targets, chunk_size).split([len(c) for _, c in rows]))
    return [next(values) if n else hidden.new_zeros(0, dtype=torch.float32) for n in sizes]


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0,
                epsilon: float = 0.2, epsilon_high: float | None = None, loss_type: str = "dapo",
                max_completion_length: int | None = None, total_tokens: float | None = None):
    """Clipped GRPO surrogate on masked tokens. Shapes: (B, T) tensors, advantages (B,).

    Returns (loss, stats). stats holds sums and counts (plain floats) so that callers can add them
    over micro-batches and ranks before dividing: clip_sum, kl_sum, ratio_sum over `tokens`.
    For "dapo", pass total_tokens = trained tokens in the whole optimisation step (all micro-batches,
    all ranks). The loss is that of this micro-batch alone: multiply it by `objective_share` before
    backward, and the gradients summed over micro-batches and ranks are those of the whole batch,
    however it was split.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    shape = logprobs.shape
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs {tuple(shape)}")
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({shape[0]},)")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")

    mask = mask.float()
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None].float()
    high = epsilon if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * adv, clipped * adv)          # (B, T)
    kl = None
    if beta > 0:
        # k3 estimator of KL(policy || ref): exp(d) - d - 1 with d = ref - policy; >= 0, and its
        # gradient pulls the policy toward the reference (so it is added, never subtracted).
        d = ref_logprobs - logprobs
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl

    masked = per_token * mask
    count = mask.sum()
    if loss_type == "grpo":
        loss = (masked.sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / count.clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (shape[0] * max_completion_length)
    else:
        loss = masked.sum() / (total_tokens if total_tokens is not None else count.clamp(min=1))

    with torch.no_grad():
        was_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
        stats = dict(tokens=count.item(), clip_sum=(was_clipped.float() * mask).sum().item(),
                     ratio_sum=(ratio * mask).sum().item(),
                     kl_sum=(kl * mask).sum().item() if kl is not None else 0.0)
    return loss, stats


def objective_share(loss_type: str, rows: int, total_rows: float, mask_tokens: float, local_tokens: float,
                    world: int) -> float:
    """The factor that scales a micro-batch's `policy_loss` to its share of the step's global objective,
    so that summing share x loss (and its gradient) over micro-batches and ranks gives the objective of
    the whole batch, however it was split (normalising each micro-batch on its own is the usual bug:
    TRL issue #3021 and PR #3231, loss normalisation across micro-batches and ranks).

    rows, mask_tokens: this micro-batch's rows and trained tokens; local_tokens: trained tokens of
    this rank's step; total_rows: rows of the step over all ranks; world: the number of ranks.
    - "dapo": 1, the loss is already divided by the global token count (`total_tokens`).
    - "grpo", "dr_grpo": rows / total_rows, both average over the rows of the whole batch.
    - "bnpo": mask_tokens / local_tokens / world, a token mean per rank, averaged over the ranks.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "dapo":
        return 1.0
    if loss_type == "bnpo":
        return mask_tokens / max(local_tokens, 1) / world
    return rows / total_rows


def summarize_stats(sums: dict) -> dict:
    """policy_loss stats summed over micro-batches (and ranks) -> fractions and means per trained token."""
    n = max(sums.get("tokens", 0), 1)
    return dict(clip_fraction=sums.get("clip_sum", 0.0) / n, mean_ratio=sums.get("ratio_sum", 0.0) / n,
                mean_kl=sums.get("kl_sum", 0.0) / n)
