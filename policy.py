"""The policy being trained, and its GRPO update: what rrr.py's steps sample from and train.

- `Policy`: the FSDP-sharded model with fp32 master weights, a full copy in the compute dtype that each
  rank samples from alone (its weights exist only inside `sampling`), the frozen reference model for
  the KL term, the tokenizer, the stop tokens and the optimizer. `load_policy` builds it.
- `sample`: one sampling call with the run's flags, for rrr.py's steps and rerest.py's alike.
- `grpo_update`: one optimisation step on a rank's episodes, in micro-batches of whole groups whose
  shared context is computed once (grpo.packed_logprobs), each micro-batch's loss (grpo.policy_loss)
  scaled to its share of the global objective (grpo.objective_share).
"""

from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch

import parallel as par
from grpo import objective_share, packed_logprobs, policy_loss, summarize_stats
from model import adapters_off, add_lora, load_model, parameter_count, right_pad, stop_token_ids
from runs import LORA_LINEAR, BadInput, bf16_by_default, show_progress
from sampler import decoder_body, fuse_projections, generate


@dataclass
class Policy:
    model: torch.nn.Module          # FSDP-sharded, fp32 master weights: trained
    sampler: torch.nn.Module        # a full copy in the compute dtype that each rank samples from alone;
                                    # its weights exist only inside `sampling(pol)`
    ref: torch.nn.Module | None     # the frozen initial model for the KL term, sharded like the model;
                                    # None with --use-peft: the model with its adapters off is the reference
    tokenizer: object
    stops: list[int]
    optimizer: torch.optim.Optimizer

    def decode(self, tokens):
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


@dataclass
class MicroBatch:
    """One forward/backward pass of the update: whole groups of G episodes (one context each; rrr.py's
    tries after the first retry have a context of their own), `rows` in all."""
    groups: list[tuple[list[int], list[list[int]]]]   # (shared context, [trained tokens of each episode])
    advantages: torch.Tensor                # (rows,)
    mask: torch.Tensor                      # (rows, T): 1 on the trained tokens that get a loss
    ref_logprobs: torch.Tensor | None       # (rows, T): the reference model's, for the KL term (--beta > 0)
    old_logprobs: torch.Tensor | None = None   # (rows, T): the sampling policy's (--num-iterations > 1)


def resolve_gradient_checkpointing(cfg, path: str | None = None):
    """--gradient-checkpointing's default (on above 1B parameters) for the model at `path` (default
    --model), from its config alone; both scripts apply it before they record their settings."""
    if cfg.gradient_checkpointing is None:
        cfg.gradient_checkpointing = par.checkpointing_by_default(parameter_count(path or cfg.model))


def resolve_model_flags(cfg, path: str | None = None):
    """The defaults that depend on the model (`path`, default --model), applied before a run records its
    settings, from the model's config alone (no weights read): --gradient-checkpointing (on above 1B
    parameters) and, with --use-peft, --lora-target-modules (every linear layer of a decoder block)."""
    resolve_gradient_checkpointing(cfg, path)
    if cfg.use_peft and not cfg.lora_target_modules:
        cfg.lora_target_modules = list(LORA_LINEAR)


def load_policy(cfg, d, path: str | None = None) -> Policy:
    """The trained model (sharded), the sampler (an empty full copy) and the reference model (sharded,
    compute dtype), from `path` (default: --model; rrr.py passes its warm start). Loaded on the CPU:
    sharding moves one layer at a time to the device, so no rank ever holds a whole fp32 model there."""
    path = path or cfg.model
    model, tokenizer = load_model(path, device="cpu", dtype=torch.float32)
    try:
        decoder_body(model)           # the sampler's check: a Llama-family decoder, or one line and exit 2
    except ValueError as e:
        raise BadInput(str(e)) from None
    compute = torch.bfloat16 if cfg.bf16 else torch.float32
    sampler = fuse_projections(par.empty_copy(model, compute, d.device))
    par.free_weights(sampler)
    stops = stop_token_ids(tokenizer, model)
    if cfg.use_peft:      # after the sampler's copy, which keeps the plain layers and gets merged weights
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.seed, cfg.lora_target_modules or LORA_LINEAR)
    model.train()
    # On a CPU with AMX, torch's flash-attention kernel runs its bf16 backward slower than its fp32 one;
    # Hugging Face's eager attention multiplies on the bf16 (AMX) kernels around an fp32 softmax: 1.3 s less
    # of a 19 s update on B (BENCHMARKS.md), for keeping each layer's (rows, heads, T, T) probabilities until
    # backward. The reference model computes as the model does (equal weights give exactly zero KL); the
    # sampler keeps its own attention; bf16 on other CPUs keeps torch's, as it was not measured there.
    attention = "eager" if cfg.bf16 and d.device.type == "cpu" and bf16_by_default(d.device) else None
    if attention:
        model.set_attn_implementation(attention)
    par.shard_model(model, d, bf16=cfg.bf16, checkpointing=cfg.gradient_checkpointing)
    ref = None
    if cfg.beta > 0 and not cfg.use_peft:   # in the compute dtype: parameters cast, the rotary table fp32
        ref, _ = load_model(path, device="cpu", dtype=compute)
        if attention:
            ref.set_attn_implementation(attention)
        par.shard_model(ref.requires_grad_(False), d, bf16=cfg.bf16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    return Policy(model, sampler, ref, tokenizer, stops, optimizer)


@contextmanager
def sampling(pol):
    """The sampler's full weights exist inside this block only: gathered from the shards (a layer at a
    time, in the compute dtype) on entry, freed on exit, so they never sit beside the update."""
    par.copy_full_weights(pol.model, pol.sampler)
    try:
        yield
    finally:
        par.free_weights(pol.sampler)


def stop_of(tokens, finished):
    """The stop token that ended a sampled row (None: cut at its length limit): how its next turn opens."""
    return tokens[-1] if finished else None


def sample(model, stops, prompts, cfg, *, temperature, max_new_tokens=None, num_samples=1, generator=None,
           cache=None, keep_cache=False):
    """sampler.generate with the run's flags: up to max_new_tokens (default --max-completion-length) per row,
    CUDA graphs unless --no-cuda-graphs. The model's q/k/v and gate/up are laid back to back first, so that
    decoding multiplies by views, not per-call copies: a no-op when they already are (rrr.py's sampler),
    needed again after a move between devices (rerest.py's par.off_device)."""
    fuse_projections(model)
    limit, rows = max_new_tokens or cfg.max_completion_length, len(prompts) * num_samples
    if prompts:
        show_progress(f"sampling {rows} rows: prefill", now=True)
    return generate(model, prompts, max_new_tokens=limit, num_samples=num_samples,
                    temperature=temperature, stop_token_ids=stops, generator=generator, cache=cache,
                    keep_cache=keep_cache, cuda_graphs=cfg.cuda_graphs,
                    progress=lambda k: show_progress(f"sampling {rows} rows: token {k}/{limit}"))


def trained_length_limit(cfg) -> int:
    """The length limit of what rrr.py trains, which dr_grpo divides by: the reflection's in RRR; with a
    generic reflection the retry is trained, and in plain GRPO the first attempt, both
    --max-completion-length."""
    if cfg.method == "rrr" and cfg.reflection == "model":
        return cfg.max_reflection_length
    return cfg.max_completion_length


def grpo_update(cfg, d, pol, episodes, length_limit: int) -> dict:
    """One optimisation step (or --num-iterations) on this rank's episodes. The G episodes of a failure
    share their context, which is computed once per group (grpo.packed_logprobs). Gradients are summed
    over micro-batches and ranks, and each micro-batch's loss is scaled to its share of the global
    objective (grpo.objective_share), so the step does not depend on how the batch is split (TRL issue
    #3021 and PR #3231: loss normalisation across micro-batches and ranks). `length_limit`: the trained
    part's token limit, which dr_grpo divides by."""
    trained = [e.ids[e.span[0]:e.span[1]] for e in episodes]
    # --mask-truncated-completions zeroes a cut row's mask but keeps its tokens in the forward pass:
    # every rank then runs the same forward and backward calls whatever its data (FSDP's collectives
    # must line up), and a micro-batch whose rows were all cut still has a graph to run backward on. An
    # episode the sandbox could not judge is masked the same way: it gets no loss.
    kept = [0.0 if (cfg.mask_truncated_completions and e.truncated) or not e.judged else 1.0
            for e in episodes]
    local_tokens = sum(len(t) * k for t, k in zip(trained, kept))
    total_tokens, total_rows = par.all_sum([local_tokens, len(episodes)], d)
    sums, loss_total, grad_norm = dict(tokens=0.0, clip_sum=0.0, ratio_sum=0.0, kl_sum=0.0), 0.0, 0.0
    if total_tokens == 0:       # a global count: every rank returns here together, before any collective
        return dict(loss=0.0, grad_norm=0.0, **summarize_stats(sums))
    batches = micro_batches(cfg, d, pol, episodes, trained, kept)
    pol.model.train()
    for _ in range(cfg.num_iterations):
        with par.gathered_across_micro_batches(pol.model, d):     # one CPU process: gathered once per update
            for i, mb in enumerate(batches):
                show_progress(f"update: micro-batch {i + 1}/{len(batches)}")
                lp = right_pad(packed_logprobs(pol.model, mb.groups, d.device))            # (rows, T)
                old = lp.detach() if mb.old_logprobs is None else mb.old_logprobs
                loss, st = policy_loss(lp, old, mb.advantages, mb.mask, ref_logprobs=mb.ref_logprobs,
                                       beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                       loss_type=cfg.loss_type, max_completion_length=length_limit,
                                       total_tokens=total_tokens)
                share = objective_share(cfg.loss_type, len(mb.advantages), total_rows, mb.mask.sum().item(),
                                        local_tokens, d.world)
                # Gradients are reduce-scattered after every micro-batch: skipping that for all but the last
                # would keep a full unsharded fp32 gradient on every rank (30 GB for a 7B model).
                (loss * share * d.world).backward()     # FSDP averages over ranks: * world makes it a sum
                loss_total += loss.item() * share
                for k in sums:
                    sums[k] += st[k]
        if cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(pol.model.parameters(), cfg.max_grad_norm)
        else:
            norms = [torch.linalg.vector_norm(par.full_tensor(p.grad)) for p in pol.model.parameters()
                     if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms))
        grad_norm = float(par.full_tensor(norm))
        pol.optimizer.step()
        pol.optimizer.zero_grad(set_to_none=True)
    g = par.all_sum([loss_total / cfg.num_iterations] + [sums[k] for k in sums], d)
    return dict(loss=g[0], grad_norm=grad_norm, **summarize_stats(dict(zip(sums, g[1:]))))


def micro_batches(cfg, d, pol, episodes, trained, kept) -> list[MicroBatch]:
    """This rank's episodes in micro-batches of whole groups (--micro-batch-size rows at most, one group
    at least), with the reference model's log-probs and, for --num-iterations > 1, the sampling policy's."""
    G = cfg.num_generations
    per_micro = max(1, cfg.micro_batch_size // G)            # whole groups per forward/backward pass
    if not episodes:    # a rank with nothing to train (rrr.py's --dynamic-sampling kept none of its groups)
        stop = pol.stops[0]     # runs the same calls as the others, on a one-token stand-in with no loss
        episodes = [SimpleNamespace(ids=[stop, stop], span=(1, 2), advantage=0.0)]
        trained, kept = [[stop]], [0.0]
    starts = list(range(0, len(episodes), G * per_micro))
    # Ranks can hold different numbers of episodes (rrr.py's --attempts > 2: a chain goes on only while its
    # retries fail). Each runs as many micro-batches as the busiest, the extra ones a copy of its first with
    # no loss, so that FSDP's collectives (here the reference model's, later the update's) line up.
    most = max(par.all_gather_objects(len(starts), d)) if d.world > 1 else len(starts)
    batches = []
    # The reference's passes gather each layer once for all micro-batches, as the update's do (one CPU
    # process: parallel.gathered_across_micro_batches).
    reference = reference_model(pol) if cfg.beta > 0 else None
    with par.gathered_across_micro_batches(reference, d):
        for number, start in enumerate(starts + [0] * (most - len(starts))):
            rows = list(range(start, min(start + G * per_micro, len(episodes))))
            groups = []     # (context, [trained parts]): runs of up to G rows with one context, computed once
            for r in rows:
                context = episodes[r].ids[:episodes[r].span[0]]
                if groups and len(groups[-1][1]) < G and groups[-1][0] == context:
                    groups[-1][1].append(trained[r])
                else:
                    groups.append((context, [trained[r]]))
            extra = number >= len(starts)
            adv = torch.tensor([0.0 if extra else episodes[r].advantage for r in rows], device=d.device)
            mask = right_pad([torch.full((len(trained[r]),), 0.0 if extra else kept[r]) for r in rows])
            mask = mask.to(d.device)                            # (rows, T)
            ref = reference_logprobs(pol, groups, d.device) if reference is not None else None
            batches.append(MicroBatch(groups, adv, mask, ref))
    if cfg.num_iterations > 1:          # the policy that sampled: fixed before the first update
        with torch.no_grad():
            for mb in batches:
                mb.old_logprobs = right_pad(packed_logprobs(pol.model, mb.groups, d.device))
    return batches


def reference_model(pol):
    """The model the KL term's log-probs come from: the reference model, or with --use-peft the trained
    model itself, run with its adapters switched off (reference_logprobs)."""
    return pol.ref if pol.ref is not None else pol.model


@torch.no_grad()
def reference_logprobs(pol, groups, device) -> torch.Tensor:
    """(rows, T) log-probs of the trained tokens under the initial model: the reference model, or with
    --use-peft the trained model with its adapters switched off (the base weights, which never change)."""
    model = reference_model(pol)
    with adapters_off(model):
        logprobs = right_pad(packed_logprobs(model, groups, device)).float()
    model.reshard()       # the root's gathered weights (embeddings, head) wait till next time
    return logprobs
