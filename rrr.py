"""Reflect, Retry, Reward (Bensal et al. 2025): GRPO that rewards only the self-reflection.

    python rrr.py --task countdown                                  # embedded SmolLM2-135M, 2-core CPU, ~8 min
    torchrun --nproc_per_node=8 rrr.py --task countdown --model Qwen/Qwen2.5-1.5B-Instruct ...
    torchrun --nproc_per_node=2 rrr.py --task countdown             # 2 CPU processes (gloo)

The algorithm, one function per step (the README lists the same steps):
  1. load_splits          the task's train and test examples
  2. evaluate             first-try and second-try accuracy of the untrained model
  3. build_failure_set    up to --failure-samples first attempts per training query; keep the failures
  4. rollout + grpo_update  per step: G reflections per failure, one retry each, reward = the verifier on
                          the retry; advantages per group; only the reflection tokens are trained
  5. evaluate + write_report  every --eval-every steps and at the end; report.md/.json (95% intervals, paired
                          tests; --forgetting-eval adds another task's first try), plot.png, final/

Where to change things: the reward is `task.check_batch` (verifiers.py via data/); the prompts are the
task's `reflection_prompt` / `retry_prompt` (data/); the loss is grpo.policy_loss; which tokens are trained
is `Episode.span`, set in `rollout`.

Simplifications: one retry per reflection; evaluation is greedy; the training sequence of an episode stops
at the end of its reflection (the retry comes later in the sequence, so it cannot change the reflection
tokens' log-probs: it only decides the reward). Controls: `--reflection generic` puts a fixed reflection
text in place of the model's and, having no reflection to train, trains the retry tokens; `--method grpo`
is plain GRPO on first attempts of the same failure set (the usual RLVR baseline).
"""

import functools
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import parallel as par
from data import get_task, resolve_data_dir
from grpo import group_advantages, packed_logprobs, policy_loss, summarize_stats, zero_variance_fraction
from model import chat_ids, load_model, next_turn_ids, stop_token_ids
from runs import (BadInput, append_jsonl, change_text, flag, main_guard, markdown_table, paired_change, parse_config,
                  pct, plot_panels, prepare_out, read_jsonl, with_interval, write_json)
from compare import CAPTION, method_name, outcomes, paper_table
from sampler import fuse_projections, generate

GENERIC_REFLECTION = ("I made a mistake in my previous answer. I will read the task again carefully, "
                      "check every step, and then give a corrected answer.")


@dataclass
class Config:
    task: str = flag("countdown", "task to train on", choices=["countdown", "function_calling"])
    model: str | None = flag(None, "Hugging Face model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    data_dir: str | None = flag(None, "folder with the real data sets (countdown/, function_calling/); default "
                                "$RRR_DATA_DIR, else offline data (generated Countdown, small samples)")
    out: str | None = flag(None, "run folder (default runs/<method>-<task>)")
    method: str = flag("rrr", "rrr: train the reflection; grpo: plain GRPO on first attempts", choices=["rrr", "grpo"])
    reflection: str = flag("model", "model: the model writes its reflection; generic: a fixed generic text "
                           "(a control: then the retry tokens are trained)", choices=["model", "generic"])
    steps: int = flag(8, "training steps")
    train_size: int = flag(32, "training queries to draw failures from")
    eval_size: int = flag(32, "test examples to evaluate on (the report says which part of the split that is)")
    forgetting_eval: list[str] | None = flag(None, "forgetting check (the paper's): greedy first-try accuracy on this "
                                             "task's test split (--eval-size examples) before and after training",
                                             choices=["gsm8k", "countdown", "function_calling", "mbpp"])
    batch_size: int = flag(2, "failures per step, over all ranks (a multiple of the number of ranks)")
    num_generations: int = flag(4, "reflections per failure: the GRPO group size G")
    failure_samples: int = flag(4, "first attempts drawn per training query at most, stopping at the first failure (paper: 64)")
    max_completion_length: int = flag(128, "tokens per attempt (first try and retry)")
    max_reflection_length: int = flag(64, "tokens per reflection")
    temperature: float = flag(1.0, "sampling temperature for training rollouts and the failure set")
    learning_rate: float = flag(1e-6, "AdamW learning rate")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0: off)")
    beta: float = flag(0.001, "k3 KL coefficient to the initial model (paper: 0.001; 0 skips the reference model)")
    epsilon: float = flag(0.2, "PPO clip range, lower side")
    epsilon_high: float | None = flag(None, "PPO clip range, upper side (default: --epsilon)")
    loss_type: str = flag("dapo", "token aggregation: grpo (per-sequence means), bnpo (local token mean), "
                          "dr_grpo (sum / (B * the trained part's length limit: --max-reflection-length in RRR)), dapo (global token mean)",
                          choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    scale_rewards: str = flag("group", "advantage scaling: group std, batch std, or none", choices=["group", "batch", "none"])
    num_iterations: int = flag(1, "updates per rollout batch (PPO epochs); >1 uses the clipped ratio")
    mask_truncated_completions: bool = flag(False, "give no loss to reflections cut at --max-reflection-length")
    micro_batch_size: int = flag(8, "rows per forward/backward pass")
    sampling_batch_size: int = flag(16, "training queries per rank in one sampling call of the failure set (a call "
                                    "covers this x ranks queries, so every rank has work)")
    bf16: bool | None = flag(None, "compute in bf16 with fp32 master weights and fp32 log-probs for the loss "
                             "(TRL's name); default: on with CUDA, off on CPU (--no-bf16 turns it off)")
    gradient_checkpointing: bool | None = flag(None, "recompute each decoder layer's activations in backward "
                                               "instead of keeping them; default: on above 1B parameters")
    cuda_graphs: bool = flag(True, "on CUDA, capture each decode-step shape as a CUDA graph and replay it "
                             "(--no-cuda-graphs decodes eagerly, with the same kernels)")
    eval_every: int = flag(0, "evaluate every N steps (0: only before and after training)")
    save_every: int = flag(4, "checkpoint every N steps (0: never)")
    resume: bool = flag(False, "continue the run in --out from its last checkpoint")
    failure_set: str | None = flag(None, "reuse the failures.jsonl of another run (same task, model and training queries)")
    log_episodes: int = flag(4, "whole episodes per step written to episodes.jsonl")
    seed: int = flag(0, "seed for data order, sampling and offline data")
    device: str | None = flag(None, "cpu or cuda (default: cuda when available)", choices=["cpu", "cuda"])


@dataclass
class Failure:
    id: str                    # the training example
    attempt: list[int]         # the failed first attempt, as sampled
    attempt_stop: int | None   # the stop token that ended it (None: cut at max length)
    feedback: str              # the verifier's verdict on it
    samples: int               # first attempts drawn until this one failed


@dataclass
class Episode:
    id: str
    ids: list[int]             # context + trained tokens: what the update sees
    span: tuple[int, int]      # the trained tokens: ids[span[0]:span[1]]
    reward: float
    truncated: bool            # the trained part was cut at its max length
    sampled: int               # tokens sampled for this episode (trained part + retry)
    text: dict = field(default_factory=dict)
    advantage: float = 0.0


@dataclass
class Policy:
    model: torch.nn.Module          # FSDP-sharded, fp32 master weights: trained
    sampler: torch.nn.Module        # a full copy in the compute dtype that each rank samples from alone;
                                    # its weights exist only inside `sampling(pol)`
    ref: torch.nn.Module | None     # the frozen initial model for the KL term, sharded like the model
    tokenizer: object
    stops: list[int]
    optimizer: torch.optim.Optimizer

    def decode(self, tokens):
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def seed_for(cfg, purpose: int, step: int, rank: int) -> int:
    """A distinct, reproducible sampling seed per (purpose, step, rank): resuming needs no saved sampler state."""
    return ((cfg.seed * 1_000_003 + purpose) * 1_000_003 + step) * 1_009 + rank


def generator(cfg, d, purpose, step):
    return torch.Generator(d.device).manual_seed(seed_for(cfg, purpose, step, d.rank))


@functools.lru_cache(maxsize=256)
def turn(tokenizer, text: str, ended_with: int | None) -> tuple[int, ...]:
    return tuple(next_turn_ids(tokenizer, text, ended_with))


# --- 1. data -----------------------------------------------------------------------------------------

def load_splits(cfg):
    task = get_task(cfg.task)
    data_dir = resolve_data_dir(cfg.data_dir)
    train = task.load("train", data_dir=data_dir, size=cfg.train_size, seed=cfg.seed)
    test = task.load("test", data_dir=data_dir, size=cfg.eval_size, seed=cfg.seed)
    if not train or not test:
        raise BadInput(f"task {cfg.task}: empty split (train {len(train)}, test {len(test)})")
    return task, train, test


def load_policy(cfg, d) -> Policy:
    """The trained model (sharded), the sampler (an empty full copy) and the reference model (sharded,
    compute dtype). Loaded on the CPU: sharding moves one layer at a time to the device, so no rank
    ever holds a whole fp32 model there."""
    model, tokenizer = load_model(cfg.model, device="cpu", dtype=torch.float32)
    try:
        from sampler import _layers
        _layers(model)
    except ValueError as e:
        raise BadInput(str(e)) from None
    if cfg.gradient_checkpointing is None:
        cfg.gradient_checkpointing = par.checkpointing_by_default(model)
    compute = torch.bfloat16 if cfg.bf16 else torch.float32
    sampler = fuse_projections(par.empty_copy(model, compute, d.device))
    par.free_weights(sampler)
    stops = stop_token_ids(tokenizer, model)
    model.train()
    par.shard_model(model, d, bf16=cfg.bf16, checkpointing=cfg.gradient_checkpointing)
    ref = None
    if cfg.beta > 0:     # loaded in the compute dtype: parameters cast, the rotary table kept in fp32
        ref, _ = load_model(cfg.model, device="cpu", dtype=compute)
        par.shard_model(ref.requires_grad_(False), d, bf16=cfg.bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
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


# --- sampling pieces shared by evaluation, the failure set and training ---------------------------

def sample(pol, prompts, cfg, *, max_new_tokens, num_samples=1, temperature, gen=None, cache=None, keep_cache=False):
    return generate(pol.sampler, prompts, max_new_tokens=max_new_tokens, num_samples=num_samples,
                    temperature=temperature, stop_token_ids=pol.stops, generator=gen, cache=cache,
                    keep_cache=keep_cache, cuda_graphs=cfg.cuda_graphs)


def stop_of(tokens, finished):
    return tokens[-1] if finished else None


def generic_turn(pol, task) -> list[int]:
    """The fixed generic reflection as a finished assistant turn, then the retry-prompt turn."""
    tok = pol.tokenizer
    return (list(tok(GENERIC_REFLECTION, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
            + list(turn(tok, task.retry_prompt, tok.eos_token_id)))


def reflect_and_retry(cfg, pol, task, prefixes, num_samples, temperature, gen):
    """prefixes: prompt + attempt 1 + the reflection-prompt turn. Samples num_samples reflections per
    prefix (prefilled once, shared), then one retry after each, continuing the reflection's cache.
    Returns (reflections, retries); reflections is None with --reflection generic."""
    if cfg.reflection == "generic":
        retries = sample(pol, [p + generic_turn(pol, task) for p in prefixes], cfg, temperature=temperature,
                         max_new_tokens=cfg.max_completion_length, num_samples=num_samples, gen=gen)
        return None, retries
    refl = sample(pol, prefixes, cfg, max_new_tokens=cfg.max_reflection_length, num_samples=num_samples,
                  temperature=temperature, gen=gen, keep_cache=True)
    chunks = [list(turn(pol.tokenizer, task.retry_prompt, stop_of(t, f))) for t, f in zip(refl.tokens, refl.finished)]
    retries = sample(pol, chunks, cfg, max_new_tokens=cfg.max_completion_length, temperature=temperature,
                     gen=gen, cache=refl.cache)
    refl.cache = None        # consumed by the retry, which grew it in place: free it now
    return refl, retries


def reflection_prefix(pol, task, prompt_ids, attempt, stop):
    return list(prompt_ids) + list(attempt) + list(turn(pol.tokenizer, task.reflection_prompt, stop))


# --- 2 and 5. evaluation ---------------------------------------------------------------------------

@torch.no_grad()
def evaluate(cfg, d, pol, task, examples, step, out, batch=32) -> dict:
    """Greedy first try on each example; for the failures, greedy reflection and retry. A first-try
    success counts as a second-try success. Each rank takes its share; counts are summed."""
    mine = examples[d.rank::d.world]
    first = second = 0
    rows = []
    with sampling(pol):
        for start in tqdm(range(0, len(mine), batch), desc=f"eval step {step}", disable=not d.main, leave=False):
            part = mine[start:start + batch]
            prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in part]
            gen1 = sample(pol, prompts, cfg, max_new_tokens=cfg.max_completion_length, temperature=0)
            verdicts = task.check_batch([pol.decode(t) for t in gen1.tokens], part)
            failed = [i for i, v in enumerate(verdicts) if not v.ok]
            ok2 = {}
            if failed:
                prefixes = [reflection_prefix(pol, task, prompts[i], gen1.tokens[i], stop_of(gen1.tokens[i], gen1.finished[i]))
                            for i in failed]
                refl, retries = reflect_and_retry(cfg, pol, task, prefixes, 1, 0.0, None)
                again = task.check_batch([pol.decode(t) for t in retries.tokens], [part[i] for i in failed])
                ok2 = {i: v.ok for i, v in zip(failed, again)}
            for i, (ex, v) in enumerate(zip(part, verdicts)):
                first += v.ok
                second += v.ok or ok2.get(i, False)
                rows.append(dict(id=ex.id, first=v.ok, second=v.ok or ok2.get(i, False), attempt=pol.decode(gen1.tokens[i])))
    first, second, n = par.all_sum([first, second, len(mine)], d)
    result = dict(step=step, first=first / n, second=second / n, n=int(n))
    all_rows = par.all_gather_objects(rows, d)
    if d.main:
        append_jsonl(out / "evals.jsonl", [result])
        append_jsonl(out / "eval_answers.jsonl", [dict(r, step=step) for rs in all_rows for r in rs])
    return result


@torch.no_grad()
def evaluate_forgetting(cfg, d, pol, step, out) -> dict:
    """The paper's forgetting check: greedy first-try results per item on each --forgetting-eval task's
    test split, at `step`. Kept in forgetting.jsonl, so a resumed run does not redo step 0."""
    found = par.broadcast_object(read_jsonl(out / "forgetting.jsonl") if d.main else None, d)
    results = {}
    for name in cfg.forgetting_eval or []:
        results[name] = {r["id"]: r["ok"] for r in found if r["task"] == name and r["step"] == step}
        if results[name]:
            continue
        task = get_task(name)
        examples = task.load("test", data_dir=resolve_data_dir(cfg.data_dir), size=cfg.eval_size, seed=cfg.seed)
        mine, rows = examples[d.rank::d.world], []
        with sampling(pol):
            for start in range(0, len(mine), 32):
                part = mine[start:start + 32]
                gen = sample(pol, [chat_ids(pol.tokenizer, ex.messages) for ex in part], cfg,
                             max_new_tokens=cfg.max_completion_length, temperature=0)
                verdicts = task.check_batch([pol.decode(t) for t in gen.tokens], part)
                rows += [dict(task=name, step=step, id=ex.id, ok=v.ok) for ex, v in zip(part, verdicts)]
        rows = [r for rs in par.all_gather_objects(rows, d) for r in rs]
        if d.main:
            append_jsonl(out / "forgetting.jsonl", rows)
        results[name] = {r["id"]: r["ok"] for r in rows}
    return results


# --- 3. the failure set ----------------------------------------------------------------------------

def failure_set_meta(cfg) -> dict:
    """The settings a failure set depends on: its first line, which a run reusing or resuming it must match."""
    return dict(task=cfg.task, model=cfg.model, data_dir=cfg.data_dir, train_size=cfg.train_size, seed=cfg.seed,
                failure_samples=cfg.failure_samples, max_completion_length=cfg.max_completion_length,
                temperature=cfg.temperature)


def check_failure_set(cfg, train):
    """--failure-set must name a finished failure set built with this run's settings. Checked before the run
    folder is created, and only read: a refused run creates and changes nothing."""
    path = Path(cfg.failure_set)
    if not path.is_file():
        raise BadInput(f"--failure-set {path}: no such file")
    try:
        rows = read_jsonl(path)
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--failure-set {path}: cannot be read ({type(e).__name__})") from None
    theirs, ours = rows[0].get("meta") if rows and isinstance(rows[0], dict) else None, failure_set_meta(cfg)
    if not isinstance(theirs, dict):
        raise BadInput(f"--failure-set {path}: not a failure set (its first line is not a meta line)")
    changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if changed:
        what = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in changed)
        raise BadInput(f"--failure-set {path} was built with other settings ({what})")
    have = {r.get("id") for r in rows[1:] if isinstance(r, dict)}
    missing = sum(ex.id not in have for ex in train)
    if missing:      # a run killed while building it: resume that run, or let this one build its own
        raise BadInput(f"--failure-set {path} lacks {missing} of this run's {len(train)} training queries")


@torch.no_grad()
def build_failure_set(cfg, d, pol, task, train, out) -> list[Failure]:
    """Samples first attempts per training query until one fails (at most --failure-samples) and keeps
    the queries that failed, with that attempt. Appended to failures.jsonl chunk by chunk (a chunk is
    --sampling-batch-size queries per rank), so an interrupted run resumes where it stopped."""
    path = Path(cfg.failure_set) if cfg.failure_set else out / "failures.jsonl"
    meta = failure_set_meta(cfg)
    rows = par.broadcast_object(read_jsonl(path) if d.main else None, d)     # rank 0 reads for all
    if rows and rows[0].get("meta") != meta:
        raise BadInput(f"{path} was built with other settings: {rows[0].get('meta')}")
    on_disk = {r["id"]: r for r in rows[1:]}
    missing = sum(ex.id not in on_disk for ex in train)
    if missing and cfg.failure_set:        # another run's, used as it is: it must hold every query
        raise BadInput(f"{path} lacks {missing} of this run's training queries")
    # Chunks of the whole training list, numbered the same way in every run, and a chunk's sampling seed
    # is its number: a resumed run samples each chunk exactly as an uninterrupted run does. A chunk with a
    # row missing (a crash can cut its write short) is redone whole: its rows were sampled together, and
    # redoing only the missing ones would draw them in a smaller batch, with other random numbers.
    chunks = list(par.rank_chunks(train, cfg.sampling_batch_size, d))
    whole = [all(ex.id in on_disk for ex in chunk) for chunk, _ in chunks]
    done = {ex.id: on_disk[ex.id] for (chunk, _), w in zip(chunks, whole) if w for ex in chunk}
    todo = [k for k, w in enumerate(whole) if not w]
    if todo and d.main:
        # The file starts again from the header and the whole chunks: a redone chunk's old rows and a cut
        # line go, so it ends as an uninterrupted run's. Written aside and renamed: a crash here leaves
        # the old file or the new one.
        tmp = path.with_name(path.name + ".tmp")
        kept = [dict(meta=meta)] + [done[ex.id] for ex in train if ex.id in done]
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
    with sampling(pol):
        for k in tqdm(todo, desc="failure set", disable=not d.main):
            chunk, part = chunks[k]
            gen = generator(cfg, d, 1, k)
            found = {}
            used = {ex.id: 0 for ex in part}
            pending, n = list(part), 1
            while pending:   # rounds of 1, 2, 4, ... attempts for each query that has not failed yet
                n = min(n, cfg.failure_samples - used[pending[0].id])
                prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in pending]
                g = sample(pol, prompts, cfg, max_new_tokens=cfg.max_completion_length, num_samples=n,
                           temperature=cfg.temperature, gen=gen)
                verdicts = task.check_batch([pol.decode(t) for t in g.tokens], [ex for ex in pending for _ in range(n)])
                for i, ex in enumerate(pending):
                    for j in range(n):
                        r = i * n + j
                        if not verdicts[r].ok and ex.id not in found:
                            found[ex.id] = dict(id=ex.id, failed=True, attempt=g.tokens[r], feedback=verdicts[r].feedback,
                                                attempt_stop=stop_of(g.tokens[r], g.finished[r]), samples=used[ex.id] + j + 1)
                    used[ex.id] += n
                pending = [ex for ex in pending if ex.id not in found and used[ex.id] < cfg.failure_samples]
                n *= 2
            new = [found.get(ex.id, dict(id=ex.id, failed=False, samples=used[ex.id])) for ex in part]
            for rs in par.all_gather_objects(new, d):
                done.update((r["id"], r) for r in rs)
            if d.main:
                append_jsonl(path, [done[ex.id] for ex in chunk])
    return [Failure(r["id"], r["attempt"], r["attempt_stop"], r["feedback"], r["samples"])
            for ex in train if (r := done[ex.id])["failed"]]


# --- 4. training --------------------------------------------------------------------------------------

@torch.no_grad()
def rollout(cfg, d, pol, task, failures, examples, step) -> list[Episode]:
    """This rank's failures -> num_generations episodes each, with rewards and advantages. Samples
    from pol.sampler: call it inside `sampling(pol)`."""
    G = cfg.num_generations
    gen = generator(cfg, d, 2, step)
    exs = [examples[f.id] for f in failures]
    prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in exs]
    if cfg.method == "grpo":            # plain GRPO: G first attempts; the attempt is trained and scored
        contexts = prompts
        trained = retries = sample(pol, prompts, cfg, max_new_tokens=cfg.max_completion_length, num_samples=G,
                                   temperature=cfg.temperature, gen=gen)
    else:
        prefixes = [reflection_prefix(pol, task, p, f.attempt, f.attempt_stop) for p, f in zip(prompts, failures)]
        refl, retries = reflect_and_retry(cfg, pol, task, prefixes, G, cfg.temperature, gen)
        if refl is not None:            # RRR: the reflection is trained; the retry only decides the reward
            contexts, trained = prefixes, refl
        else:                           # generic reflection: the retry is all the model wrote
            contexts, trained = [p + generic_turn(pol, task) for p in prefixes], retries
    verdicts = task.check_batch([pol.decode(t) for t in retries.tokens], [exs[r // G] for r in range(len(retries.tokens))])
    rewards = torch.tensor([float(v.ok) for v in verdicts])
    advantages = advantages_of(cfg, d, rewards)
    episodes = []
    for r, toks in enumerate(trained.tokens):
        ctx, failure = contexts[r // G], failures[r // G]
        text = dict(prompt=exs[r // G].messages[-1]["content"], attempt=pol.decode(failure.attempt),
                    reflection=pol.decode(toks) if trained is not retries else None,
                    retry=pol.decode(retries.tokens[r]), feedback=verdicts[r].feedback)
        if cfg.method == "grpo":
            text.update(attempt=text.pop("retry"), reflection=None)
        sampled = len(toks) + (len(retries.tokens[r]) if trained is not retries else 0)
        episodes.append(Episode(exs[r // G].id, list(ctx) + list(toks), (len(ctx), len(ctx) + len(toks)),
                                rewards[r].item(), not trained.finished[r], sampled, text, advantages[r].item()))
    return episodes


def advantages_of(cfg, d, rewards):
    if cfg.scale_rewards != "batch":
        return group_advantages(rewards, cfg.num_generations, scale=cfg.scale_rewards)
    # "batch" divides by the std of the whole global batch, all ranks together.
    s, s2, n = par.all_sum([rewards.sum(), (rewards ** 2).sum(), rewards.numel()], d)
    std = (max(s2 - s * s / n, 0.0) / max(n - 1, 1)) ** 0.5
    return group_advantages(rewards, cfg.num_generations, scale="none") / (std + 1e-4)


def grpo_update(cfg, d, pol, episodes) -> dict:
    """One optimisation step (or --num-iterations) on this rank's episodes. The G episodes of a failure
    share their context, which is computed once per group (grpo.packed_logprobs). Gradients are summed
    over micro-batches and ranks, and each micro-batch's loss is scaled to its share of the global
    objective, so the step does not depend on how the batch is split (RESEARCH.md pitfall 1)."""
    G = cfg.num_generations
    trained = [e.ids[e.span[0]:e.span[1]] for e in episodes]
    # --mask-truncated-completions zeroes a cut row's mask but keeps its tokens in the forward pass:
    # every rank then runs the same forward and backward calls whatever its data (FSDP's collectives
    # must line up), and a micro-batch whose rows were all cut still has a graph to run backward on.
    kept = [0.0 if cfg.mask_truncated_completions and e.truncated else 1.0 for e in episodes]
    local_tokens = sum(len(t) * k for t, k in zip(trained, kept))
    total_tokens, total_rows = par.all_sum([local_tokens, len(episodes)], d)
    # dr_grpo divides by the length limit of what is trained: the reflection's in RRR; with a generic
    # reflection the retry is trained, and in plain GRPO the first attempt, both --max-completion-length.
    limit = cfg.max_reflection_length if cfg.method == "rrr" and cfg.reflection == "model" else cfg.max_completion_length
    per_micro = max(1, cfg.micro_batch_size // G)            # whole groups per forward/backward pass
    batches = []
    for start in range(0, len(episodes), G * per_micro):
        rows = list(range(start, min(start + G * per_micro, len(episodes))))
        groups = [(episodes[r].ids[:episodes[r].span[0]], [trained[q] for q in rows[i:i + G]])
                  for i, r in enumerate(rows) if i % G == 0]
        adv = torch.tensor([episodes[r].advantage for r in rows], device=d.device)
        mask = pad_rows([torch.full((len(trained[r]),), kept[r]) for r in rows]).to(d.device)     # (rows, T)
        ref = None
        if cfg.beta > 0:
            with torch.no_grad():
                ref = pad_rows(packed_logprobs(pol.ref, groups, d.device)).float()
            pol.ref.reshard()       # the root's gathered weights (embeddings, head) are not needed until next time
        batches.append([groups, adv, mask, ref, None])
    if cfg.num_iterations > 1:          # the policy that sampled: fixed before the first update
        with torch.no_grad():
            for b in batches:
                b[4] = pad_rows(packed_logprobs(pol.model, b[0], d.device))
    sums, loss_total, grad_norm = dict(tokens=0.0, clip_sum=0.0, ratio_sum=0.0, kl_sum=0.0), 0.0, 0.0
    if total_tokens == 0:
        return dict(loss=0.0, grad_norm=0.0, **summarize_stats(sums))
    pol.model.train()
    for _ in range(cfg.num_iterations):
        for groups, adv, mask, ref, old in batches:
            lp = pad_rows(packed_logprobs(pol.model, groups, d.device))              # (rows, T)
            loss, st = policy_loss(lp, lp.detach() if old is None else old, adv, mask, ref_logprobs=ref,
                                   beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                   loss_type=cfg.loss_type, max_completion_length=limit,
                                   total_tokens=total_tokens)
            # Share of the global objective: dapo is already normalised by the global token count;
            # grpo and dr_grpo average over rows; bnpo is a token mean per rank, averaged over ranks.
            share = {"dapo": 1.0, "grpo": len(adv) / total_rows, "dr_grpo": len(adv) / total_rows,
                     "bnpo": mask.sum().item() / max(local_tokens, 1) / d.world}[cfg.loss_type]
            # Gradients are reduce-scattered after every micro-batch: skipping that for all but the last
            # would keep a full unsharded fp32 gradient on every rank (30 GB for a 7B model).
            (loss * share * d.world).backward()     # FSDP averages over ranks: * world makes it a sum
            loss_total += loss.item() * share
            for k in sums:
                sums[k] += st[k]
        if cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(pol.model.parameters(), cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(par.full_tensor(p.grad))
                                                         for p in pol.model.parameters() if p.grad is not None]))
        grad_norm = float(par.full_tensor(norm))
        pol.optimizer.step()
        pol.optimizer.zero_grad(set_to_none=True)
    g = par.all_sum([loss_total / cfg.num_iterations] + [sums[k] for k in sums], d)
    return dict(loss=g[0], grad_norm=grad_norm, **summarize_stats(dict(zip(sums, g[1:]))))


def pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-row 1-D tensors -> (rows, longest), zero-padded (at least one column)."""
    width = max([len(r) for r in rows] + [1])
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])


def step_batch(cfg, d, failures, step) -> list[Failure]:
    """This rank's share of the failures for `step`: a seeded permutation per epoch, so the data position
    is a function of the step alone."""
    n, B = len(failures), cfg.batch_size
    picked = []
    for k in range(step * B, (step + 1) * B):
        epoch, i = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        picked.append(failures[order[i]])
    share = B // d.world
    return picked[d.rank * share:(d.rank + 1) * share]


# --- 5. report ----------------------------------------------------------------------------------------

def write_report(cfg, out, evals, metrics, wall, split_size, forgetting):
    """report.md, report.json and plot.png: the paper's table with 95% Wilson intervals and, on the same
    test items, the exact McNemar test of each change from the vanilla model (compare.py's table, one run)."""
    vanilla, trained = evals[0], evals[-1]
    answers = read_jsonl(out / "eval_answers.jsonl")
    at = {s: outcomes({r["id"]: r for r in answers if r["step"] == s}) for s in (0, trained["step"])}
    what = method_name(asdict(cfg))
    _, rows, numbers = paper_table([dict(name=f"trained ({trained['step']} steps)", method=what, steps=trained["step"],
                                         vanilla=at[0], trained=at[trained["step"]])], True)
    # The paper's columns; the changes and their tests follow the table.
    header, rows = ["model", "first try", "second try"], [[r[0], r[3], r[4]] for r in rows]
    forgot = {}
    for name, (before, after) in forgetting.items():     # extra columns: first try on another task
        n = len(before)
        header.append(f"{name} first try ({n} items)")
        rows[0].append(with_interval(sum(before.values()), n))
        rows[1].append(with_interval(sum(after.values()), n))
        forgot[name] = dict(before=sum(before.values()) / n, after=sum(after.values()) / n,
                            change=paired_change(before, after))
    table = markdown_table(header, rows)
    subset = "the whole split" if trained["n"] >= split_size else "a subset (--eval-size), not the paper's full test set"
    rewards = [m["reward"] for m in metrics]
    lines = [f"# {what} on {cfg.task}: {cfg.model or 'SmolLM2-135M-Instruct (embedded)'}", "",
             f"Test set: {trained['n']} of {split_size} {cfg.task} test examples, {subset}. Training: {len(metrics)} "
             f"steps of {cfg.batch_size} failures x {cfg.num_generations} generations. Wall time {wall / 60:.1f} min.", "",
             table, "", CAPTION, "",
             f"- first try, vanilla -> trained: {change_text(numbers[0]['change_first'])}",
             f"- second try, vanilla -> trained: {change_text(numbers[0]['change_second'])}"]
    lines += [f"- forgetting, {name} first try: {change_text(f['change'])}" for name, f in forgot.items()]
    lines += ["", f"Mean reward (retry success) per step: first {pct(rewards[0] if rewards else None)}, last "
              f"{pct(rewards[-1] if rewards else None)}; zero-variance groups on average "
              f"{pct(sum(m['zero_variance_groups'] for m in metrics) / max(len(metrics), 1))}.", "",
              "![reward and accuracy](plot.png)", "",
              "plot.png, left: mean reward per training step (blue). Right: test accuracy at each evaluation, "
              "first try (blue) and second try (red). y from 0 to 1."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json(out / "report.json", dict(config=asdict(cfg), test=dict(n=trained["n"], split_size=split_size),
                                         vanilla=vanilla, trained=trained, paired=numbers[0], forgetting=forgot,
                                         evals=evals, steps=metrics, wall_seconds=wall))
    steps = [m["step"] for m in metrics]
    plot_panels(out / "plot.png", [[(steps, rewards)],
                                   [([e["step"] for e in evals], [e["first"] for e in evals]),
                                    ([e["step"] for e in evals], [e["second"] for e in evals])]])
    return table


def run(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    for name in ("steps", "train_size", "eval_size", "batch_size", "num_generations", "failure_samples",
                 "max_completion_length", "max_reflection_length", "micro_batch_size", "num_iterations",
                 "sampling_batch_size"):
        if getattr(cfg, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.method == "grpo" and cfg.reflection == "generic":
        raise BadInput("--reflection generic applies to --method rrr only")
    out = Path(cfg.out or f"runs/{cfg.method}-{cfg.task}")
    started = time.time()
    d = par.init_distributed(cfg.device)
    try:
        if cfg.batch_size % d.world:
            raise BadInput(f"--batch-size {cfg.batch_size} must be a multiple of the {d.world} ranks")
        if cfg.bf16 is None:
            cfg.bf16 = d.device.type == "cuda"
        task, train, test = load_splits(cfg)                                         # 1
        if cfg.failure_set:     # before the run folder exists: a refused run leaves nothing behind
            on_rank0(d, lambda: check_failure_set(cfg, train))
        saved = on_rank0(d, lambda: prepare_out(out, asdict(cfg), cfg.resume))
        par.check_shared_folder(out, d)
        pol = load_policy(cfg, d)
        state = par.load_checkpoint(out / "checkpoints", pol.model, pol.optimizer, d) if saved else None
        start = state["step"] if state else 0
        # Rank 0 reads the run folder for everyone: on several nodes only the shared folder is certain.
        evals, metrics = par.broadcast_object(
            [[r for r in read_jsonl(out / name) if r["step"] <= start] for name in ("evals.jsonl", "metrics.jsonl")]
            if d.main else None, d)
        if d.main:   # drop what a crash left after the checkpoint; it is recomputed identically
            for name, rows in (("evals.jsonl", evals), ("metrics.jsonl", metrics)):
                (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if not evals:
            evals.append(evaluate(cfg, d, pol, task, test, 0, out))                    # 2
        forgetting_before = evaluate_forgetting(cfg, d, pol, 0, out)
        failures = build_failure_set(cfg, d, pol, task, train, out)                     # 3
        if not failures:
            raise BadInput("the model solved every training query: no failures to learn from")
        examples = {ex.id: ex for ex in train}
        bar = tqdm(range(start, cfg.steps), desc="train", disable=not d.main, initial=start, total=cfg.steps)
        for step in bar:                                                                # 4
            t0 = time.time()
            with sampling(pol):
                episodes = rollout(cfg, d, pol, task, step_batch(cfg, d, failures, step), examples, step)
            t1 = time.time()
            stats = grpo_update(cfg, d, pol, episodes)
            t2 = time.time()
            row = step_metrics(cfg, d, step + 1, episodes, stats, t0, t1, t2)
            metrics.append(row)
            everyone = [e for es in par.all_gather_objects(episodes, d) for e in es]
            if d.main:
                append_jsonl(out / "metrics.jsonl", [row])
                append_jsonl(out / "episodes.jsonl", [dict(step=step + 1, **asdict(e)) for e in everyone[:cfg.log_episodes]])
                bar.set_postfix(reward=f"{row['reward']:.2f}", loss=f"{row['loss']:.4f}")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                evals.append(evaluate(cfg, d, pol, task, test, step + 1, out))          # 5
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                par.save_checkpoint(out / "checkpoints", step + 1, pol.model, pol.optimizer, dict(), d)
        if evals[-1]["step"] != cfg.steps:
            evals.append(evaluate(cfg, d, pol, task, test, cfg.steps, out))             # 5
        forgetting_after = evaluate_forgetting(cfg, d, pol, cfg.steps, out)
        if d.main:
            split_size = len(task.load("test", data_dir=resolve_data_dir(cfg.data_dir), seed=cfg.seed))
            forgetting = {k: (forgetting_before[k], forgetting_after[k]) for k in forgetting_before}
            table = write_report(cfg, out, evals, metrics, time.time() - started, split_size, forgetting)
            print(f"\n{table}\n\nreport: {out / 'report.md'}")
        par.export_hf(pol.model, pol.tokenizer, out / "final", d)
    finally:
        par.close_distributed()


def on_rank0(d, work):
    """work() on rank 0 only (it reads and writes the run folder); its result, or its BadInput, on every
    rank. Every rank checking the folder itself would race with rank 0 creating it."""
    outcome = None
    if d.main:
        try:
            outcome = ("ok", work())
        except BadInput as e:
            outcome = ("bad", str(e))
    outcome = par.broadcast_object(outcome, d)
    if outcome[0] == "bad":
        raise BadInput(outcome[1])
    return outcome[1]


def step_metrics(cfg, d, step, episodes, stats, t0, t1, t2) -> dict:
    """Global means over all ranks' episodes. `trained_*` describe the trained part: the reflection in RRR."""
    rewards = torch.tensor([e.reward for e in episodes])
    G = cfg.num_generations
    trained = sum(e.span[1] - e.span[0] for e in episodes)
    g = par.all_sum([rewards.sum(), len(episodes), zero_variance_fraction(rewards, G) * len(episodes) / G,
                     trained, sum(e.truncated for e in episodes), sum(e.sampled for e in episodes),
                     sum(len(e.ids) for e in episodes)], d)
    n, groups = max(g[1], 1), max(g[1] / G, 1)
    return dict(step=step, reward=g[0] / n, zero_variance_groups=g[2] / groups, trained_length=g[3] / n,
                trained_truncated=g[4] / n, **stats, sample_tokens_per_s=g[5] / max(t1 - t0, 1e-9),
                train_tokens_per_s=g[6] / max(t2 - t1, 1e-9), sample_seconds=t1 - t0, train_seconds=t2 - t1,
                step_seconds=t2 - t0)


if __name__ == "__main__":
    main_guard(run)
