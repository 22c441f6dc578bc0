"""Reflect, Retry, Reward (Bensal et al. 2025): GRPO that rewards only the self-reflection.

    python rrr.py --task countdown      # embedded SmolLM2-135M, 2-core CPU: 10.5 min fp32 (A), 5.1 bf16 (B)
    torchrun --nproc_per_node=8 rrr.py --task countdown --model Qwen/Qwen2.5-1.5B-Instruct
    torchrun --nproc_per_node=2 rrr.py --task countdown             # 2 CPU processes (gloo)
    python rrr.py --config recipes/countdown-qwen2.5-1.5b-rrr.json  # the paper's setup (recipes/)

The algorithm, one function per step (docs/rrr.md lists the same steps), in the order `run` calls them:
  1. load_splits          the task's train and test examples (data/); policy.load_policy: the model
                          (after warmstart.py's labelled warm start, with --warm-start)
  2. evaluate             accuracy after each try (first, second, ... --attempts) of the untrained model
                          (and, with --forgetting-eval, evaluate_forgetting: another task's first try)
  3. build_failure_set    (failures.py) up to --failure-samples first attempts per training query; keep
                          the failures
  4. train_step           per step: failures.step_batch picks the failures (--dynamic-sampling: draws
                          again until enough groups' rewards differ); rollout (rrr_rollout) samples G
                          reflections per failure and one retry each, reward() of the retry's verdict,
                          advantages per group; policy.grpo_update trains only the reflection tokens
  5. evaluate, write_rrr_report  every --eval-every steps and at the end: report.md/.json (report.py),
                          plot.png; final/ (parallel.export_hf)

Where to change things: the reward is `reward(verdict)`, the verdict coming from the task's verifier
(`verify` in data/<task>.py, calling verifiers.py; MBPP's `verify_batch` checks a batch at once); the
prompts are the task's `reflection_prompt` / `retry_prompt`, or --reflection-prompt / --retry-prompt,
and `reflection_text` builds the reflection turn; the loss is grpo.policy_loss; which tokens are trained
is `Episode.span`, set in `rrr_rollout`.

Self-correction variants, off by default (the paper's algorithm): --attempts K > 2 reflects and retries
again after each failed retry (rrr_rollout says how groups are formed and what it costs);
--reflection-feedback shows the verifier's feedback on the failed try in the reflection prompt.

Simplifications: one retry per reflection; evaluation is greedy; the training sequence of an episode stops
at the end of its reflection (the retry comes later in the sequence, so it cannot change the reflection
tokens' log-probs: it only decides the reward). Controls: `--reflection generic` puts a fixed reflection
text in place of the model's and, having no reflection to train, trains the retry tokens; `--method grpo`
is plain GRPO on first attempts of the same failure set (the usual RLVR baseline).
"""

import functools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data import TASKS, check_split, data_dir_used, get_task, load_splits, resolve_data_dir, test_split_size
from data.countdown import check_warm_start
from runs import (EMBEDDED_MODEL, LORA_LINEAR, LR_SCHEDULER_TYPES, REPORT_TO, BadInput, MachineFlags, Tracker,
                  announce, append_jsonl, apply_lr_schedule, check_at_least, check_lr_schedule,
                  check_model_name, flag, main_guard, open_tracker, parse_config, prepare_out, progress_bar,
                  read_jsonl, resolve_machine_flags)

GENERIC_REFLECTION = ("I made a mistake in my previous answer. I will read the task again carefully, "
                      "check every step, and then give a corrected answer.")
DEFAULT_OUT = "runs/{method}-{task}"
SEED_ROLLOUT = 2          # the rollouts' seed purpose (par.sampling_generator; the failure set's is 1)
EVAL_BATCH = 32          # examples per greedy sampling call in evaluation
AT_LEAST_ONE = ("steps", "train_size", "eval_size", "batch_size", "num_generations", "failure_samples",
                "lora_r", "max_completion_length", "max_reflection_length", "micro_batch_size",
                "num_iterations", "sampling_batch_size", "save_total_limit", "max_num_gen_batches")
NOT_NEGATIVE = ("warm_start", "temperature", "learning_rate", "weight_decay", "max_grad_norm", "beta",
                "lora_alpha", "epsilon", "epsilon_high", "eval_every", "save_every", "log_episodes")


@dataclass
class Config(MachineFlags):     # + --bf16, --gradient-checkpointing, --cuda-graphs, --device
    task: str = flag("countdown", "task to train on", choices=TASKS)
    model: str | None = flag(None, "Hugging Face model folder or hub id (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    warm_start: int = flag(0, "first fine-tune --model on this many solver-written answers to generated "
                           "puzzles outside the test split (warmstart.py; cached): a labelled warm start, "
                           "said in config.json and the report (0: none)")
    warm_start_reflections: bool = flag(False, "with --warm-start: the labels also cover the reflection turn "
                                        "(a reflection built from the verifier's verdict on a wrong answer, "
                                        "then the solver's retry; warmstart.py --reflections)")
    data_dir: str | None = flag(None, "folder with the real data sets (countdown/, function_calling/); "
                                "default $RRR_DATA_DIR, else offline data (generated Countdown, samples)")
    out: str | None = flag(None, "run folder (default runs/<method>-<task>)")
    method: str = flag("rrr", "rrr: train the reflection; grpo: plain GRPO on first attempts",
                       choices=["rrr", "grpo"])
    reflection: str = flag("model", "model: the model writes its reflection; generic: a fixed generic text "
                           "(a control: then the retry tokens are trained)", choices=["model", "generic"])
    attempts: int = flag(2, "tries per query: a first try, then a reflection and a retry after each failed "
                         "try, up to this many in all (the paper: 2); each reflection is rewarded by the "
                         "retry after it")
    reflection_feedback: bool = flag(False, "the reflection prompt also shows the verifier's feedback on the "
                                     "failed try (MBPP: the visible tests' part only); off: the paper's "
                                     "prompt alone")
    reflection_prompt: str | None = flag(None, "the reflection prompt (default: the task's, the paper's "
                                         "verbatim)")
    retry_prompt: str | None = flag(None, "the retry prompt (default: the task's, which asks for its answer "
                                    "format)")
    steps: int = flag(8, "training steps")
    train_size: int = flag(32, "training queries to draw failures from")
    eval_size: int = flag(32, "test (--eval-split) examples to evaluate on (the report says which part of "
                          "the split that is)")
    eval_split: str = flag("test", "the split evaluations score (dev: the Countdown tasks' puzzles apart "
                           "from train and test, to choose settings by)", choices=["test", "dev"])
    forgetting_eval: list[str] | None = flag(None, "forgetting check (the paper's): greedy first-try "
                                             "accuracy on this task's test split (--eval-size examples) "
                                             "before and after training", choices=TASKS)
    batch_size: int = flag(2, "failures per step, over all ranks (a multiple of the number of ranks)")
    num_generations: int = flag(4, "reflections per failure: the GRPO group size G")
    failure_samples: int = flag(4, "first attempts per training query at most, until one fails (paper: 64)")
    max_completion_length: int = flag(128, "tokens per attempt (first try and retry)")
    max_reflection_length: int = flag(64, "tokens per reflection")
    temperature: float = flag(1.0, "sampling temperature for training rollouts and the failure set")
    learning_rate: float = flag(1e-6, "AdamW learning rate")
    lr_scheduler_type: str = flag("constant", "learning-rate schedule over --steps, as transformers' (TRL's "
                                  "flag): linear or cosine decay to 0 (the --num-iterations updates of a "
                                  "step share its rate)", choices=list(LR_SCHEDULER_TYPES))
    warmup_ratio: float = flag(0.0, "linear or cosine: the first ceil(this x --steps) steps rise linearly "
                               "from 0 (TRL's flag; in [0, 1))")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0: off)")
    beta: float = flag(0.001, "k3 KL coefficient to the initial model (paper: 0.001; 0 skips the reference "
                       "model)")
    epsilon: float = flag(0.2, "PPO clip range, lower side")
    epsilon_high: float | None = flag(None, "PPO clip range, upper side (default: --epsilon)")
    loss_type: str = flag("dapo", "token aggregation: grpo (per-sequence means), bnpo (local token mean), "
                          "dr_grpo (sum / (B * the trained part's length limit: --max-reflection-length in "
                          "RRR)), dapo (global token mean)", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    scale_rewards: str = flag("group", "advantage scaling: group std, batch std, or none",
                              choices=["group", "batch", "none"])
    dynamic_sampling: bool = flag(False, "DAPO's: draw --batch-size failures (G rollouts each) again until "
                                  "--batch-size groups' rewards differ (at most --max-num-gen-batches draws) "
                                  "and train on those. Costs up to that many times a step's sampling; pays "
                                  "when p, the success rate, is near 0 or 1: a group's rewards differ with "
                                  "probability 1 - p^G - (1 - p)^G (off: the paper's)")
    max_num_gen_batches: int = flag(4, "--dynamic-sampling's cap on draws per step, the first included")
    num_iterations: int = flag(1, "updates per rollout batch (PPO epochs); >1 uses the clipped ratio")
    use_peft: bool = flag(False, "train LoRA adapters only (TRL's name); the KL reference is the model with "
                          "them off (no copy); final/ merged, adapters.safetensors alone. Use about 10x full "
                          "fine-tuning's learning rate (LoRA Without Regret, Thinking Machines 2025)")
    lora_r: int = flag(16, "LoRA rank, with --use-peft (TRL's default; 1-32 suit RL)")
    lora_alpha: float = flag(32.0, "LoRA alpha, with --use-peft: the update is scaled by alpha / r")
    lora_target_modules: list[str] | None = flag(None, "each decoder block's linear layers that get adapters "
                                                 "(default: all seven)", choices=LORA_LINEAR)
    mask_truncated_completions: bool = flag(False, "give no loss to reflections cut at "
                                            "--max-reflection-length")
    micro_batch_size: int = flag(8, "rows per forward/backward pass")
    sampling_batch_size: int = flag(16, "training queries per rank in one sampling call of the failure set "
                                    "(a call covers this x ranks queries, so every rank has work)")
    eval_every: int = flag(0, "evaluate every N steps (0: only before and after training)")
    save_every: int = flag(4, "checkpoint every N steps (0: never)")
    save_total_limit: int = flag(1, "checkpoints kept, the newest (1: the last, all --resume needs)")
    report_to: str = flag("none", "where per-step metrics also go, while the run goes: tensorboard "
                          "writes <out>/tensorboard; wandb logs to Weights & Biases", choices=list(REPORT_TO))
    resume: bool = flag(False, "continue the run in --out from its last checkpoint")
    failure_set: str | None = flag(None, "reuse the failures.jsonl of another run (same task, model and "
                                   "training queries)")
    log_episodes: int = flag(4, "whole episodes per step written to episodes.jsonl")
    seed: int = flag(0, "seed for data order, sampling and offline data")


def run_folder(cfg) -> Path:
    return Path(cfg.out or DEFAULT_OUT.format(method=cfg.method, task=cfg.task))


def check_flags(cfg):
    """Everything that can be refused before torch loads and the run folder is touched, each in one line."""
    check_at_least(cfg, AT_LEAST_ONE, 1)
    check_at_least(cfg, NOT_NEGATIVE, 0)
    check_at_least(cfg, ("attempts",), 2)        # a first try and a retry
    check_lr_schedule(cfg)
    check_model_name(cfg.model)
    check_warm_start(cfg.task, cfg.warm_start, cfg.warm_start_reflections)
    check_split(cfg.task, cfg.eval_split, "--eval-split")
    resolve_data_dir(cfg.data_dir)
    if cfg.method == "grpo" and cfg.reflection == "generic":
        raise BadInput("--reflection generic applies to --method rrr only")
    for name in ("reflection_prompt", "retry_prompt"):
        if getattr(cfg, name) is not None and not getattr(cfg, name).strip():
            raise BadInput(f"--{name.replace('_', '-')} is empty: give the prompt's text, or leave the flag "
                           "out for the task's")
    if cfg.resume and not (run_folder(cfg) / "config.json").exists():
        raise BadInput(f"--resume: no run to continue in {run_folder(cfg)} (no config.json)")


if __name__ == "__main__":      # a bad flag fails here, in a fraction of a second, before torch loads (3-5 s)
    main_guard(lambda argv: check_flags(parse_config(Config, argv, description=__doc__)))

# torch and the modules that load it come after the early check of the command line, on purpose.
import torch

import parallel as par
from report import solved_after_each_try, write_rrr_report
from failures import build_failure_set, check_failure_set, dynamic_sampling, step_batch
from grpo import group_advantages, zero_variance_fraction
from model import chat_ids, next_turn_ids
from policy import grpo_update, load_policy, sample, sampling, stop_of, trained_length_limit
from warmstart import model_for_run


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
    judged: bool = True        # False: the sandbox could not run the retry; no reward, no loss
    scored_try: int = 2        # the try whose success is the reward: 2, the first retry (1: plain GRPO's)
    failure: int = 0           # its failure's place in the rollout's list: with scored_try, its group


# --- 1. data and the model are data.load_splits and policy.load_policy --------------------------------
# --- 2 and 5. evaluation (5's report: report.write_rrr_report); first, the sampling pieces it shares --

@functools.lru_cache(maxsize=256)
def turn(tokenizer, text: str, ended_with: int | None) -> tuple[int, ...]:
    return tuple(next_turn_ids(tokenizer, text, ended_with))


def generic_turn(cfg, pol) -> list[int]:
    """The fixed generic reflection as a finished assistant turn, then the retry-prompt turn."""
    tok = pol.tokenizer
    return (list(tok(GENERIC_REFLECTION, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
            + list(turn(tok, cfg.retry_prompt, tok.eos_token_id)))


def reflection_text(cfg, feedback: str) -> str:
    """The reflection prompt's turn: --reflection-prompt (the task's by default) and, with
    --reflection-feedback, the verifier's feedback on the failed try (Verdict.feedback_to_show: for MBPP
    the visible tests' results; hidden tests are never described)."""
    if cfg.reflection_feedback:
        return f"{cfg.reflection_prompt}\n\nFeedback on that answer: {feedback}"
    return cfg.reflection_prompt


def reflection_prefix(cfg, pol, context, attempt, stop, feedback):
    """context + the failed try + the reflection-prompt turn: what a reflection is sampled after."""
    return list(context) + list(attempt) + list(turn(pol.tokenizer, reflection_text(cfg, feedback), stop))


def reflect_and_retry(cfg, pol, prefixes, num_samples, temperature, gen):
    """prefixes: a conversation up to a failed try + the reflection-prompt turn (reflection_prefix). Samples
    num_samples reflections per prefix (prefilled once, shared), then one retry after each, continuing the
    reflection's cache. Returns (reflections, retries, the context each retry was sampled after: prefix +
    reflection + retry-prompt turn); reflections is None with --reflection generic."""
    def draw(prompts, **kw):
        return sample(pol.sampler, pol.stops, prompts, cfg, temperature=temperature, generator=gen, **kw)

    if cfg.reflection == "generic":
        contexts = [p + generic_turn(cfg, pol) for p in prefixes]
        retries = draw(contexts, num_samples=num_samples)
        return None, retries, [contexts[r // num_samples] for r in range(len(retries.tokens))]
    refl = draw(prefixes, max_new_tokens=cfg.max_reflection_length, num_samples=num_samples, keep_cache=True)
    chunks = [list(turn(pol.tokenizer, cfg.retry_prompt, stop_of(t, f)))
              for t, f in zip(refl.tokens, refl.finished)]
    retries = draw(chunks, cache=refl.cache)
    refl.cache = None        # consumed by the retry, which grew it in place: free it now
    contexts = [prefixes[r // num_samples] + list(refl.tokens[r]) + chunks[r] for r in range(len(chunks))]
    return refl, retries, contexts


def next_reflection_prefix(cfg, pol, context, retry, finished, verdict):
    """A conversation up to a failed try (the first, or a retry), ready for the reflection on it."""
    return reflection_prefix(cfg, pol, context, retry, stop_of(retry, finished), verdict.feedback_to_show())


def first_tries(cfg, pol, task, examples):
    """Greedy first attempts, EVAL_BATCH examples per call. Yields (examples, their prompts, the
    generation, the verdicts) per call."""
    for start in range(0, len(examples), EVAL_BATCH):
        part = examples[start:start + EVAL_BATCH]
        prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in part]
        gen = sample(pol.sampler, pol.stops, prompts, cfg, temperature=0)
        yield part, prompts, gen, task.check_batch([pol.decode(t) for t in gen.tokens], part)


def with_base(key, value) -> dict:
    """MBPP's result on its visible tests alone (Verdict.base), where the task has one."""
    return {} if value is None else {key: value}


@torch.no_grad()
def evaluate(cfg, d, pol, task, examples, step, out) -> dict:
    """Greedy first try on each example; for the failures, greedy reflection and retry, again after each
    failed retry up to --attempts tries. A solved item stays solved: accuracy after try k counts the items
    solved by any of the first k tries. Each rank takes its share; counts are summed. Each item's row in
    eval_answers.jsonl holds its prompt (the last user turn: the puzzle), its attempt and, when the first
    try failed, the reflection and retry (with --attempts > 2, `tries`: solved after each try, and
    `later_tries`: each further reflection and retry)."""
    mine, rows, K = examples[d.rank::d.world], [], cfg.attempts
    with sampling(pol), progress_bar(total=len(mine), desc=f"eval step {step}", disable=not d.main,
                                     leave=False) as bar:
        for part, prompts, gen1, verdicts in first_tries(cfg, pol, task, mine):
            these = [dict(id=ex.id, prompt=ex.messages[-1]["content"], first=v.ok, second=v.ok,
                          attempt=pol.decode(t))
                     | with_base("first_base", v.base) | with_base("second_base", v.base)
                     | ({"judged": False} if v.infra else {})       # the sandbox failed: left out of accuracy
                     for ex, v, t in zip(part, verdicts, gen1.tokens)]
            failed = [i for i, v in enumerate(verdicts) if not v.ok and not v.infra]
            prefixes = [next_reflection_prefix(cfg, pol, prompts[i], gen1.tokens[i], gen1.finished[i],
                                               verdicts[i]) for i in failed]
            for k in range(2, K + 1):       # try k: a reflection on the failed try k - 1, then a retry
                if not failed:
                    break
                refl, retries, contexts = reflect_and_retry(cfg, pol, prefixes, 1, temperature=0.0, gen=None)
                retry_texts = [pol.decode(t) for t in retries.tokens]
                again = task.check_batch(retry_texts, [part[i] for i in failed])
                for j, (i, v) in enumerate(zip(failed, again)):
                    texts = dict(reflection=pol.decode(refl.tokens[j]) if refl else GENERIC_REFLECTION,
                                 retry=retry_texts[j])
                    unjudged = {"judged": False} if v.infra else {}
                    if k == 2:
                        base = None if v.base is None else these[i]["first_base"] or v.base
                        these[i].update(second=v.ok, **texts, **unjudged, **with_base("second_base", base))
                    else:
                        later = dict(texts, ok=v.ok) | with_base("base", v.base)
                        these[i].setdefault("later_tries", []).append(later)
                        these[i].update(unjudged)
                going = [j for j, v in enumerate(again) if not v.ok and not v.infra and k < K]
                prefixes = [next_reflection_prefix(cfg, pol, contexts[j], retries.tokens[j],
                                                   retries.finished[j], again[j]) for j in going]
                failed = [failed[j] for j in going]
            for r in these if K > 2 else ():
                r["tries"] = solved_after_each_try(r, K)
                if "first_base" in r:
                    r["tries_base"] = solved_after_each_try(r, K, base=True)
            rows += these
            bar.update(len(part))
    judged = [r for r in rows if r.get("judged", True)]
    solved = [sum(r["tries"][k] if K > 2 else r[("first", "second")[k]] for r in judged) for k in range(K)]
    counts = par.all_sum(solved + [len(judged), len(rows) - len(judged)], d)
    n = max(counts[K], 1)
    result = dict(step=step, first=counts[0] / n, second=counts[1] / n, n=int(counts[K]),
                  not_judged=int(counts[K + 1]))
    if K > 2:
        result["tries"] = [c / n for c in counts[:K]]
    all_rows = par.all_gather_objects(rows, d)
    if d.main:     # the answers first: the summary line says that the evaluation is complete
        append_jsonl(out / "eval_answers.jsonl", [dict(r, step=step) for rs in all_rows for r in rs])
        append_jsonl(out / "evals.jsonl", [result])
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
        examples = task.load("test", data_dir=resolve_data_dir(cfg.data_dir), size=cfg.eval_size,
                             seed=cfg.seed)
        rows = []
        with sampling(pol):
            for part, _, _, verdicts in first_tries(cfg, pol, task, examples[d.rank::d.world]):
                rows += [dict(task=name, step=step, id=ex.id, ok=v.ok) for ex, v in zip(part, verdicts)]
        rows = [r for rs in par.all_gather_objects(rows, d) for r in rs]
        if d.main:
            append_jsonl(out / "forgetting.jsonl", rows)
        results[name] = {r["id"]: r["ok"] for r in rows}
    return results


# --- 3. the failure set is failures.build_failure_set; 4. training (failures.step_batch picks a step's) --

def reward(verdict) -> float:
    """The reward of one scored try, from the task's verifier (verifiers.Verdict). Binary, as in the
    paper: 1 when the retry (plain GRPO: the attempt) is correct. Edit here for partial credit."""
    return float(verdict.ok)


def rewards_of(verdicts, slots: list[int], size: int):
    """reward() and whether each was judged, at `slots` of `size` places; an unjudged or empty place sits
    out its group."""
    rewards, judged = torch.zeros(size), torch.zeros(size, dtype=torch.bool)
    rewards[slots] = torch.tensor([reward(v) for v in verdicts])
    judged[slots] = torch.tensor([not v.infra for v in verdicts], dtype=torch.bool)
    return rewards, judged


def advantages_of(cfg, d, rewards, judged):
    if cfg.scale_rewards != "batch":
        return group_advantages(rewards, cfg.num_generations, scale=cfg.scale_rewards, valid=judged)
    # "batch" divides by the std of the whole global batch, all ranks together (Bessel-corrected).
    s, s2, n = par.all_sum([rewards[judged].sum(), (rewards[judged] ** 2).sum(), judged.sum()], d)
    std = (max(s2 - s * s / max(n, 1), 0.0) / max(n - 1, 1)) ** 0.5
    return group_advantages(rewards, cfg.num_generations, scale="batch", batch_std=std, valid=judged)


@torch.no_grad()
def rollout(cfg, d, pol, task, failures, examples, step) -> list[Episode]:
    """This rank's failures -> episodes with rewards and advantages: rrr_rollout, or grpo_rollout with
    --method grpo. Samples from pol.sampler: call it inside `sampling(pol)`."""
    gen = par.sampling_generator(cfg.seed, d, SEED_ROLLOUT, step)
    return (grpo_rollout if cfg.method == "grpo" else rrr_rollout)(cfg, d, pol, task, failures, examples, gen)


def grpo_rollout(cfg, d, pol, task, failures, examples, gen) -> list[Episode]:
    """Plain GRPO (the control): G first attempts at each failure's query, each trained and scored."""
    G = cfg.num_generations
    exs = [examples[f.id] for f in failures]
    prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in exs]
    attempts = sample(pol.sampler, pol.stops, prompts, cfg, temperature=cfg.temperature, num_samples=G,
                      generator=gen)
    texts = [pol.decode(t) for t in attempts.tokens]
    verdicts = task.check_batch(texts, [exs[r // G] for r in range(len(texts))])
    rewards, judged = rewards_of(verdicts, list(range(len(verdicts))), len(verdicts))
    advantages = advantages_of(cfg, d, rewards, judged)
    return [Episode(id=exs[r // G].id, ids=list(prompts[r // G]) + list(toks),
                    span=(len(prompts[r // G]), len(prompts[r // G]) + len(toks)), reward=rewards[r].item(),
                    truncated=not attempts.finished[r], sampled=len(toks),
                    text=dict(prompt=exs[r // G].messages[-1]["content"], attempt=texts[r], reflection=None,
                              feedback=verdicts[r].feedback),
                    advantage=advantages[r].item(), judged=bool(judged[r]), scored_try=1, failure=r // G)
            for r, toks in enumerate(attempts.tokens)]


def rrr_rollout(cfg, d, pol, task, failures, examples, gen) -> list[Episode]:
    """RRR: G reflections on each failure's first attempt (its prefix prefilled once, shared) and one retry
    after each; reward = the verifier on the retry; advantages within each failure's group of G. The
    reflection is trained, and the retry only decides its reward (--reflection generic: the retry is
    trained, being all the model wrote).

    --attempts K > 2: each chain whose retry failed reflects on that retry and retries again, up to K tries
    in all. A reflection's reward is the retry right after it, and its group is the chains of the same
    failure that reached the same try (group_advantages over the failure's G slots, the others left out).
    A failure then costs up to (K - 1) x G reflections and retries in sampled tokens instead of G (fewer as
    retries succeed), each later try prefilled on its own (the G chains no longer share a prefix), and the
    trained sequences grow by a reflection and a retry per try."""
    G, slots = cfg.num_generations, len(failures) * cfg.num_generations
    exs = [examples[f.id] for f in failures]
    going = list(range(slots))                  # slot r: chain r % G of failure r // G
    prefixes = [reflection_prefix(cfg, pol, chat_ids(pol.tokenizer, ex.messages), f.attempt, f.attempt_stop,
                                  f.feedback_shown) for ex, f in zip(exs, failures)]
    attempt = [pol.decode(f.attempt) for f in failures for _ in range(G)]    # the try reflected on, per slot
    shown = [reflection_text(cfg, f.feedback_shown) for f in failures for _ in range(G)]
    episodes = []
    for k in range(2, cfg.attempts + 1):        # every rank runs every try: advantages_of may all-reduce
        per = G if k == 2 else 1
        refl, retries, contexts = reflect_and_retry(cfg, pol, prefixes, per, cfg.temperature, gen)
        retry_texts = [pol.decode(t) for t in retries.tokens]
        verdicts = task.check_batch(retry_texts, [exs[r // G] for r in going])
        rewards, judged = rewards_of(verdicts, going, slots)
        advantages = advantages_of(cfg, d, rewards, judged)
        for j, r in enumerate(going):
            ctx, trained = (prefixes[j // per], refl) if refl else (contexts[j], retries)
            toks = trained.tokens[j]
            text = dict(prompt=exs[r // G].messages[-1]["content"], attempt=attempt[r],
                        reflection_prompt=shown[r], reflection=pol.decode(toks) if refl else None,
                        retry_prompt=cfg.retry_prompt, retry=retry_texts[j], feedback=verdicts[j].feedback)
            episodes.append(Episode(id=exs[r // G].id, ids=list(ctx) + list(toks),
                                    span=(len(ctx), len(ctx) + len(toks)), reward=rewards[r].item(),
                                    truncated=not trained.finished[j],
                                    sampled=len(toks) + (len(retries.tokens[j]) if refl else 0), text=text,
                                    advantage=advantages[r].item(), judged=bool(judged[r]), scored_try=k,
                                    failure=r // G))
        if k < cfg.attempts:        # the chains whose retry failed go on
            keep = [j for j, v in enumerate(verdicts) if not v.ok and not v.infra]
            for j in keep:
                attempt[going[j]] = retry_texts[j]
                shown[going[j]] = reflection_text(cfg, verdicts[j].feedback_to_show())
            prefixes = [next_reflection_prefix(cfg, pol, contexts[j], retries.tokens[j], retries.finished[j],
                                               verdicts[j]) for j in keep]
            going = [going[j] for j in keep]
    return episodes


def step_metrics(cfg, d, step, episodes, stats, sample_seconds, train_seconds) -> dict:
    """Global means over all ranks' episodes. `trained_*` describe the trained part: the reflection in RRR.
    Groups are those of the first retry (GRPO's: the attempts); with --attempts > 2, `reward_try<k>` is
    the mean reward of the reflections before try k (`reward`: of all of them)."""
    G = cfg.num_generations
    first = torch.tensor([e.reward for e in episodes if e.scored_try <= 2])      # the first n x G episodes
    tries = range(2, cfg.attempts + 1) if cfg.attempts > 2 else ()
    local = dict(reward=sum(e.reward for e in episodes), episodes=len(episodes),
                 judged=sum(e.judged for e in episodes), first=len(first),
                 flat_groups=zero_variance_fraction(first, G) * len(first) / G,
                 trained=sum(e.span[1] - e.span[0] for e in episodes),
                 truncated=sum(e.truncated for e in episodes), sampled=sum(e.sampled for e in episodes),
                 tokens=sum(len(e.ids) for e in episodes))
    for k in tries:
        local[f"reward_try{k}"] = sum(e.reward for e in episodes if e.scored_try == k)
        local[f"judged_try{k}"] = sum(e.judged for e in episodes if e.scored_try == k)
    g = dict(zip(local, par.all_sum(list(local.values()), d)))       # summed over the ranks, by name
    n = max(g["episodes"], 1)     # an unjudged episode's reward is 0: the mean reward is over the judged
    return dict(step=step, reward=g["reward"] / max(g["judged"], 1),
                not_judged=int(g["episodes"] - g["judged"]),
                zero_variance_groups=g["flat_groups"] / max(g["first"] / G, 1),
                trained_length=g["trained"] / n, trained_truncated=g["truncated"] / n, **stats,
                sample_tokens_per_s=g["sampled"] / max(sample_seconds, 1e-9),
                train_tokens_per_s=g["tokens"] / max(train_seconds, 1e-9), sample_seconds=sample_seconds,
                train_seconds=train_seconds, step_seconds=sample_seconds + train_seconds,
                **{f"reward_try{k}": g[f"reward_try{k}"] / max(g[f"judged_try{k}"], 1) for k in tries})


def train_step(cfg, d, pol, task, failures, examples, step, out) -> dict:
    """Step 4 once: this step's failures -> rollout -> update; appends its metrics and episodes."""
    def draw(index):        # batch `index`'s failures and rollout seed; draw k of step s is s x cap + k's
        return rollout(cfg, d, pol, task, step_batch(cfg, d, failures, index), examples, index)

    t0 = time.time()
    with sampling(pol):
        episodes, drawn = (dynamic_sampling(cfg, d, lambda k: draw(step * cfg.max_num_gen_batches + k))
                           if cfg.dynamic_sampling else (draw(step), {}))
    t1 = time.time()
    lr = apply_lr_schedule(pol.optimizer, cfg, step, cfg.steps)       # of the step alone: resumes exactly
    stats = dict(grpo_update(cfg, d, pol, episodes, trained_length_limit(cfg)), learning_rate=lr)
    row = step_metrics(cfg, d, step + 1, episodes, stats, t1 - t0, time.time() - t1)
    if drawn:           # the draws' metrics; the sampling throughput counts every draw's tokens
        row |= dict(drawn, sample_tokens_per_s=drawn["sampled_tokens_all_draws"] / max(t1 - t0, 1e-9))
    everyone = [e for es in par.all_gather_objects(episodes, d) for e in es]
    if d.main:
        append_jsonl(out / "metrics.jsonl", [row])
        logged = everyone[:cfg.log_episodes]
        append_jsonl(out / "episodes.jsonl", [dict(step=step + 1, **{k: v for k, v in asdict(e).items()
                                                                      if k != "failure"}) for e in logged])
    return row


# --- the driver ---------------------------------------------------------------------------------------

def resolve_prompts(cfg):
    """--reflection-prompt and --retry-prompt as used (the task's where not given), for config.json."""
    task = get_task(cfg.task)
    cfg.reflection_prompt = cfg.reflection_prompt or task.reflection_prompt
    cfg.retry_prompt = cfg.retry_prompt or task.retry_prompt


def log_eval(tracker, evals, result):
    evals.append(result)
    tracker.log({"eval/first_try": result["first"], "eval/second_try": result["second"]}, result["step"])


def run(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    out = run_folder(cfg)
    # config.json and report.json record the model, data folder, run folder and prompts used; the same
    # flags resolve alike, so --resume still compares like with like.
    cfg.model, cfg.data_dir, cfg.out = cfg.model or EMBEDDED_MODEL, data_dir_used(cfg.data_dir), str(out)
    resolve_prompts(cfg)
    announce(out, cfg, ("task", "model", "method", "reflection", "attempts", "reflection_feedback",
                        "warm_start", "steps", "batch_size", "num_generations", "learning_rate", "eval_size",
                        "eval_split"))
    started = time.time()
    d, tracker = par.init_distributed(cfg.device), Tracker()
    try:
        resolve_machine_flags(cfg, d)
        task, train, test = load_splits(cfg.task, cfg.data_dir, cfg.train_size, cfg.eval_size, cfg.seed,  # 1
                                        cfg.eval_split)
        if cfg.failure_set:     # before the run folder exists: a refused run leaves nothing behind
            par.on_rank0(d, check_failure_set, cfg, Path(cfg.failure_set), train)
        start_from, warm = model_for_run(cfg, d)     # --warm-start: built once, cached, in config.json
        recorded = dict(asdict(cfg), **({"warm_start_model": warm} if warm else {}))
        saved = par.on_rank0(d, prepare_out, out, recorded, cfg.resume)
        par.check_shared_folder(out, d)
        tracker = open_tracker(cfg.report_to, out, asdict(cfg), d.main, project="rrr")
        pol = load_policy(cfg, d, start_from)
        state = par.load_checkpoint(out / "checkpoints", pol.model, pol.optimizer, d) if saved else None
        start = state["step"] if state else 0
        evals, metrics = par.resume_step_logs(d, out, start)
        if not evals:
            log_eval(tracker, evals, evaluate(cfg, d, pol, task, test, 0, out))                 # 2
        forgetting_before = evaluate_forgetting(cfg, d, pol, 0, out)
        failures = build_failure_set(cfg, d, pol, task, train, out)                        # 3
        if not failures:
            raise BadInput("the model solved every training query: no failures to learn from")
        examples = {ex.id: ex for ex in train}
        with progress_bar(total=cfg.steps, initial=start, desc="train", disable=not d.main) as bar:
            for step in range(start, cfg.steps):                                                   # 4
                metrics.append(train_step(cfg, d, pol, task, failures, examples, step, out))
                tracker.log(metrics[-1], metrics[-1]["step"])
                bar.update()
                bar.set_postfix(reward=f"{metrics[-1]['reward']:.2f}", loss=f"{metrics[-1]['loss']:.4f}")
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                    log_eval(tracker, evals, evaluate(cfg, d, pol, task, test, step + 1, out))   # 5
                if cfg.save_every and (step + 1) % cfg.save_every == 0:
                    par.save_checkpoint(out / "checkpoints", step + 1, pol.model, pol.optimizer, dict(), d,
                                        save_total_limit=cfg.save_total_limit)
        if evals[-1]["step"] != cfg.steps:
            log_eval(tracker, evals, evaluate(cfg, d, pol, task, test, cfg.steps, out))          # 5
        forgetting_after = evaluate_forgetting(cfg, d, pol, cfg.steps, out)
        if d.main:
            split_size = test_split_size(task, cfg.data_dir, cfg.seed, cfg.eval_split)
            forgetting = {k: (forgetting_before[k], forgetting_after[k]) for k in forgetting_before}
            wall = time.time() - started
            table = write_rrr_report(recorded, out, evals, metrics, wall, split_size, forgetting)
            print(f"\n{table}\n\nreport: {out / 'report.md'}")
        par.export_hf(pol.model, pol.tokenizer, out / "final", d)
        if cfg.use_peft:
            lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_target_modules or LORA_LINEAR)
            par.export_adapters(pol.model, out / "adapters.safetensors", lora, d)
    finally:
        tracker.close()
        par.close_distributed()


if __name__ == "__main__":
    main_guard(run)
