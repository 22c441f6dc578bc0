"""Reflect, Retry, Reward (Bensal et al. 2025): GRPO that rewards only the self-reflection.

    python rrr.py --task countdown      # embedded SmolLM2-135M, 2-core CPU: 10.5 min fp32 (A), 6.0 bf16 (B)
    torchrun --nproc_per_node=8 rrr.py --task countdown --model Qwen/Qwen2.5-1.5B-Instruct
    torchrun --nproc_per_node=2 rrr.py --task countdown             # 2 CPU processes (gloo)
    python rrr.py --config recipes/countdown-qwen2.5-1.5b-rrr.json  # the paper's setup (recipes/)

The algorithm, one function per step (docs/rrr.md lists the same steps), in the order `run` calls them;
every step takes the run's state, `Run` (settings, ranks, model, task, examples, run folder):
  1. load_splits          the task's train and test examples (data/); load_policy: the model (with
                          --warm-start, after warmstart.py's labelled warm start)
  2. evaluate             greedy first try and, after a failure, a reflection and a retry, on the test
                          split (--forgetting-eval: evaluate_forgetting, another task's first try)
  3. build_failure_set    (failures.py) the failed first attempts, up to --failure-samples per query
  4. train_step           per step: failures.step_batch picks the failures (--dynamic-sampling: draws
                          again until enough groups' rewards differ); rrr_rollout samples G reflections
                          per failure and one retry each, reward() of each retry, advantages per group
                          (episodes_of); policy.grpo_update trains only the reflection tokens
  5. evaluate, write_rrr_report  every --eval-every steps and at the end: report.md/.json (report.py),
                          plot.png; final/ (parallel.export_hf)

Where to change things: the reward is `reward(verdict, completion, example)` (binary; it may return named
parts, which metrics.jsonl logs), the verdict coming from the task's verifier (`verify` in data/<task>.py,
calling verifiers.py; MBPP's `verify_batch` checks a batch at once); the prompts are the task's
`reflection_prompt` / `retry_prompt`, or --reflection-prompt / --retry-prompt, and `reflection_text`
builds the reflection turn; the loss is grpo.policy_loss; which tokens are trained is `Episode.span`, set
in `episodes_of`. Every default is resolved once, before config.json records it (resolve_flags).

Self-correction variants, off by default (the paper's algorithm): --attempts K > 2 reflects and retries
again after each failed retry (later_rounds in training, later_tries in evaluation; later_rounds says how
groups are formed and what it costs); --reflection-feedback shows the verifier's feedback in the
reflection prompt.

Simplifications: one retry per reflection; evaluation is greedy; the training sequence of an episode stops
at the end of its reflection (the retry comes later in the sequence, so it cannot change the reflection
tokens' log-probs: it only decides the reward). Controls: `--reflection generic` puts a fixed reflection
text in place of the model's and, having no reflection to train, trains the retry tokens; `--method grpo`
is plain GRPO on first attempts of the same failure set (the usual RLVR baseline).
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data import (TASKS, Task, check_split, data_dir_used, get_task, load_splits, resolve_data_dir,
                  test_split_size)
from data.countdown import check_warm_start
from runs import (EMBEDDED_MODEL, LORA_LINEAR, LR_SCHEDULER_TYPES, REPORT_TO, BadInput, MachineFlags, Tracker,
                  announce, append_jsonl, apply_lr_schedule, check_at_least, check_lr_schedule,
                  check_model_name, flag, main_guard, open_tracker, parse_config, prepare_out, progress_bar,
                  read_jsonl, resolve_machine_flags)

DEFAULT_OUT = "runs/{method}-{task}"
SEED_ROLLOUT = 2          # the rollouts' seed purpose (par.sampling_generator; the failure set's is 1)
EVAL_BATCH = 32          # examples per greedy sampling call in evaluation
STEP_LOGS = ("evals.jsonl", "metrics.jsonl", "eval_answers.jsonl", "episodes.jsonl")   # rows with a "step"
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
    warm_start: int = flag(0, "first fine-tune --model on this many solver-written answers to puzzles "
                           "outside the test split (warmstart.py; cached): a labelled warm start (0: none)")
    warm_start_reflections: bool = flag(False, "with --warm-start: the labels also cover the reflection turn "
                                        "(from the verifier's verdict) and the retry (warmstart.py)")
    data_dir: str | None = flag(None, "folder with the real data sets (countdown/, function_calling/); "
                                "default $RRR_DATA_DIR, else offline data (generated Countdown, samples)")
    out: str | None = flag(None, "run folder (default runs/<method>-<task>)")
    method: str = flag("rrr", "rrr: train the reflection; grpo: plain GRPO on first attempts",
                       choices=["rrr", "grpo"])
    reflection: str = flag("model", "model: the model writes its reflection; generic: a fixed generic text "
                           "(a control: then the retry tokens are trained)", choices=["model", "generic"])
    attempts: int = flag(2, "tries per query: a first try, then a reflection and a retry after each failed "
                         "try, up to this many (the paper: 2); a reflection's reward is the retry after it")
    reflection_feedback: bool = flag(False, "the reflection prompt also shows the verifier's feedback on the "
                                     "failed try (MBPP: the visible tests' only); off: the paper's prompt")
    reflection_prompt: str | None = flag(None, "the reflection prompt (default: the task's, the paper's)")
    retry_prompt: str | None = flag(None, "the retry prompt (default: the task's, in its answer format)")
    steps: int = flag(8, "training steps")
    train_size: int = flag(32, "training queries to draw failures from")
    eval_size: int = flag(32, "examples of the --eval-split to evaluate on (the report says which)")
    eval_split: str = flag("test", "the split evaluations score (dev: the Countdown tasks' puzzles apart "
                           "from train and test, to choose settings by)", choices=["test", "dev"])
    forgetting_eval: list[str] | None = flag(None, "the paper's forgetting check: greedy first-try accuracy "
                                             "on this task's test split, before and after", choices=TASKS)
    batch_size: int = flag(2, "failures per step, over all ranks (a multiple of the number of ranks)")
    num_generations: int = flag(4, "reflections per failure: the GRPO group size G")
    failure_samples: int = flag(4, "first attempts per training query at most, until one fails (paper: 64)")
    max_completion_length: int = flag(128, "tokens per attempt (first try and retry)")
    max_reflection_length: int = flag(64, "tokens per reflection")
    temperature: float = flag(1.0, "sampling temperature for training rollouts and the failure set")
    learning_rate: float = flag(1e-6, "AdamW learning rate")
    lr_scheduler_type: str = flag("constant", "learning-rate schedule over --steps (TRL's flag): linear or "
                                  "cosine decay to 0", choices=list(LR_SCHEDULER_TYPES))
    warmup_ratio: float = flag(0.0, "linear or cosine: the first ceil(this x --steps) steps rise linearly "
                               "from 0 (TRL's flag; in [0, 1))")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_grad_norm: float = flag(1.0, "gradient clipping norm (0: off)")
    beta: float = flag(0.001, "k3 KL coefficient to the initial model (paper: 0.001; 0: no reference model)")
    epsilon: float = flag(0.2, "PPO clip range, lower side")
    epsilon_high: float | None = flag(None, "PPO clip range, upper side (default: --epsilon)")
    loss_type: str = flag("dapo", "token aggregation: grpo (per-sequence means), bnpo (local token mean), "
                          "dr_grpo (sum / (B * length limit)), dapo (global token mean)",
                          choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    scale_rewards: str = flag("group", "advantage scaling: group std, batch std, or none",
                              choices=["group", "batch", "none"])
    dynamic_sampling: bool = flag(False, "DAPO's: draw failures again until --batch-size groups' rewards "
                                  "differ (up to --max-num-gen-batches draws); off: the paper's")
    max_num_gen_batches: int = flag(4, "--dynamic-sampling's cap on draws per step, the first included")
    num_iterations: int = flag(1, "updates per rollout batch (PPO epochs); >1 uses the clipped ratio")
    use_peft: bool = flag(False, "train LoRA adapters only (TRL's name; the KL reference is the model with "
                          "them off); about 10x full fine-tuning's learning rate suits them")
    lora_r: int = flag(16, "LoRA rank, with --use-peft (TRL's default; 1-32 suit RL)")
    lora_alpha: float = flag(32.0, "LoRA alpha, with --use-peft: the update is scaled by alpha / r")
    lora_target_modules: list[str] | None = flag(None, "each decoder block's linear layers that get adapters "
                                                 "(default: all seven)", choices=LORA_LINEAR)
    mask_truncated_completions: bool = flag(False, "no loss on reflections cut at --max-reflection-length")
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
from report import write_rrr_report
from failures import build_failure_set, check_failure_set, dynamic_sampling, step_batch
from grpo import group_advantages, zero_variance_fraction
from conversation import (GENERIC_REFLECTION, Retries, judged_failures, judged_retries, next_prefixes,
                          next_reflection_prefix, reflection_prefix, reflection_text)
from model import chat_ids
from policy import (Policy, grpo_update, load_policy, resolve_model_flags, sample, sampling,
                    trained_length_limit)
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
    parts: dict = field(default_factory=dict)    # reward()'s named parts, when it names them


@dataclass
class Run:
    """What every step reads, built once by `run` (as rerest.py's Setup); steps take it and their own."""
    cfg: Config
    d: par.Dist                # this rank, the world size, the device
    pol: Policy                # the trained model, the sampler, the reference model, the tokenizer
    task: Task                 # prompts, verify / check_batch
    test: list                 # the examples evaluations score (--eval-split, --eval-size)
    examples: dict             # the training queries by id
    out: Path


# --- evaluation (steps 2 and 5) ------------------------------------------------------------------------

def first_tries(cfg, pol, task, examples):
    """Greedy first attempts, EVAL_BATCH examples per call. Yields (examples, their prompts, the
    generation, the verdicts) per call."""
    for start in range(0, len(examples), EVAL_BATCH):
        part = examples[start:start + EVAL_BATCH]
        prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in part]
        gen = sample(pol.sampler, pol.stops, prompts, cfg, temperature=0)
        yield part, prompts, gen, task.check_batch([pol.decode(t) for t in gen.tokens], part)


def with_base(verdict) -> dict:
    """MBPP's result on its visible tests alone (Verdict.base), where the task has one: `tries_base`."""
    return {} if verdict.base is None else {"tries_base": [verdict.base]}


def unjudged(verdict) -> dict:
    """An item or episode whose program the sandbox could not run: left out of accuracy and of the loss."""
    return {"judged": False} if verdict.infra else {}


@torch.no_grad()
def evaluate(run, step) -> dict:
    """The paper's evaluation: a greedy first try on each example; for the failures, a greedy reflection and
    retry (with --attempts > 2, again after each failed retry: later_tries). A solved item stays solved:
    accuracy after try k counts the items solved by any of the first k tries. Each rank takes its share;
    counts are summed. Each item's row in eval_answers.jsonl holds its prompt (the last user turn: the
    puzzle), `tries` (solved after try 1, ..., K), its attempt and, when the first try failed, the
    reflection and retry (with --attempts > 2, `later_tries`: each further reflection and retry)."""
    cfg, d, pol, K = run.cfg, run.d, run.pol, run.cfg.attempts
    mine, rows = run.test[d.rank::d.world], []
    with sampling(pol), progress_bar(total=len(mine), desc=f"eval step {step}", disable=not d.main,
                                     leave=False) as bar:
        for part, prompts, gen1, verdicts in first_tries(cfg, pol, run.task, mine):
            these = [dict(id=ex.id, prompt=ex.messages[-1]["content"], tries=[v.ok], attempt=pol.decode(t))
                     | with_base(v) | unjudged(v) for ex, v, t in zip(part, verdicts, gen1.tokens)]
            failed = judged_failures(verdicts)
            if failed:          # try 2: a reflection on the failed first try, then a retry
                prefixes = [next_reflection_prefix(cfg, pol, prompts[i], gen1.tokens[i], gen1.finished[i],
                                                   verdicts[i]) for i in failed]
                retried = judged_retries(cfg, pol, run.task, prefixes, [part[i] for i in failed])
                add_tries(run, these, failed, retried)
                if K > 2:
                    later_tries(run, part, these, failed, retried)
            for r in these:     # each try's verdict -> solved after try 1, ..., K (solved stays solved)
                for key in r.keys() & {"tries", "tries_base"}:
                    r[key] = [any(r[key][:k + 1]) for k in range(K)]
            rows += these
            bar.update(len(part))
    judged = [r for r in rows if r.get("judged", True)]
    solved = [sum(r["tries"][k] for r in judged) for k in range(K)]
    counts = par.all_sum(solved + [len(judged), len(rows) - len(judged)], d)
    tries = [c / max(counts[K], 1) for c in counts[:K]]
    result = dict(step=step, first=tries[0], second=tries[1], n=int(counts[K]), not_judged=int(counts[K + 1]),
                  tries=tries)
    all_rows = par.all_gather_objects(rows, d)
    if d.main:     # the answers first: the summary line says that the evaluation is complete
        append_jsonl(run.out / "eval_answers.jsonl", [dict(r, step=step) for rs in all_rows for r in rs])
        append_jsonl(run.out / "evals.jsonl", [result])
    return result


def add_tries(run, rows, failed, retried: Retries):
    """Each retried item's next try: its verdict joins the row's `tries` (and `tries_base`); its reflection
    and retry are the row's own for the second try, in `later_tries` after that."""
    for j, (i, v) in enumerate(zip(failed, retried.verdicts)):
        row, texts = rows[i], dict(reflection=reflection_of(run, retried, j), retry=retried.texts[j])
        if len(row["tries"]) == 1:
            row.update(texts)
        else:
            row.setdefault("later_tries", []).append(texts)
        row["tries"].append(v.ok)
        if "tries_base" in row:
            row["tries_base"].append(bool(v.base))
        row.update(unjudged(v))


def reflection_of(run, retried: Retries, j: int) -> str:      # what the row shows as the reflection
    return run.pol.decode(retried.reflections.tokens[j]) if retried.reflections else GENERIC_REFLECTION


def later_tries(run, part, these, failed, retried: Retries):
    """--attempts K > 2 in evaluation: each item whose retry failed reflects on that retry and retries
    again, up to K tries; its row's `later_tries` lists each further reflection and retry."""
    for _ in range(3, run.cfg.attempts + 1):
        going = judged_failures(retried.verdicts)
        failed = [failed[j] for j in going]
        if not failed:
            break
        prefixes = next_prefixes(run.cfg, run.pol, retried, going)
        retried = judged_retries(run.cfg, run.pol, run.task, prefixes, [part[i] for i in failed])
        add_tries(run, these, failed, retried)


@torch.no_grad()
def evaluate_forgetting(run, step) -> dict:
    """The paper's forgetting check: greedy first-try results per item on each --forgetting-eval task's
    test split, at `step`. Kept in forgetting.jsonl, so a resumed run does not redo step 0."""
    cfg, d, out = run.cfg, run.d, run.out
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
        with sampling(run.pol):
            for part, _, _, verdicts in first_tries(cfg, run.pol, task, examples[d.rank::d.world]):
                rows += [dict(task=name, step=step, id=ex.id, ok=v.ok) for ex, v in zip(part, verdicts)]
        rows = [r for rs in par.all_gather_objects(rows, d) for r in rs]
        if d.main:
            append_jsonl(out / "forgetting.jsonl", rows)
        results[name] = {r["id"]: r["ok"] for r in rows}
    return results


# --- training (step 4) -------------------------------------------------------------------------------

def reward(verdict, completion: str, example) -> float | dict[str, float]:
    """The reward of one scored try (the retry; plain GRPO: the attempt), from the task's verifier
    (verifiers.Verdict), the try's text and its example. Binary, as in the paper: 1 when the try is
    correct. Return a dict of named parts instead (partial credit, a format term) and the reward is their
    sum, each part's mean logged in metrics.jsonl as reward_<name> (the README shows an edit)."""
    return float(verdict.ok)


def rewards_of(verdicts, completions, examples, slots: list[int], size: int):
    """(reward(), whether judged, reward()'s named parts or {}) at `slots` of `size` places; an unjudged
    place (the sandbox could not run the program) or an empty one has no reward and sits out its group."""
    rewards, judged, parts = torch.zeros(size), torch.zeros(size, dtype=torch.bool), [{} for _ in range(size)]
    for slot, v, completion, example in zip(slots, verdicts, completions, examples):
        if v.infra:
            continue
        given = reward(v, completion, example)
        if isinstance(given, dict):
            parts[slot], given = given, sum(given.values())
        rewards[slot], judged[slot] = given, True
    return rewards, judged, parts


def advantages_of(cfg, d, rewards, judged):
    if cfg.scale_rewards != "batch":
        return group_advantages(rewards, cfg.num_generations, scale=cfg.scale_rewards, valid=judged)
    # "batch" divides by the std of the whole global batch, all ranks together (Bessel-corrected).
    s, s2, n = par.all_sum([rewards[judged].sum(), (rewards[judged] ** 2).sum(), judged.sum()], d)
    std = (max(s2 - s * s / max(n, 1), 0.0) / max(n - 1, 1)) ** 0.5
    return group_advantages(rewards, cfg.num_generations, scale="batch", batch_std=std, valid=judged)


@torch.no_grad()
def rollout(run, failures, step) -> list[Episode]:
    """This rank's failures -> episodes with rewards and advantages: rrr_rollout, or grpo_rollout with
    --method grpo. Samples from pol.sampler: call it inside `sampling(pol)`."""
    gen = par.sampling_generator(run.cfg.seed, run.d, SEED_ROLLOUT, step)
    return (grpo_rollout if run.cfg.method == "grpo" else rrr_rollout)(run, failures, gen)


def rrr_rollout(run, failures, gen) -> list[Episode]:
    """RRR (the paper): G reflections on each failure's first attempt (its prefix prefilled once, shared)
    and one retry after each; reward = the verifier on the retry; advantages within each failure's group
    of G. The reflection is trained, and the retry only decides its reward (--reflection generic: the
    retry is trained, being all the model wrote). --attempts > 2 goes on in later_rounds."""
    cfg, pol, G = run.cfg, run.pol, run.cfg.num_generations
    exs = [run.examples[f.id] for f in failures]
    prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in exs]
    prefixes = [reflection_prefix(cfg, pol, prompt, f.attempt, f.attempt_stop, f.feedback_shown)
                for prompt, f in zip(prompts, failures)]
    slots = list(range(len(failures) * G))      # slot r: reflection r % G on failure r // G
    tried = [(pol.decode(f.attempt), reflection_text(cfg, f.feedback_shown))      # per slot: the try
             for f in failures for _ in range(G)]                                 # and the prompt shown
    queries = [exs[r // G] for r in slots]
    retried = judged_retries(cfg, pol, run.task, prefixes, queries, G, cfg.temperature, gen)
    episodes = episodes_of(run, exs, slots, prefixes, G, retried, tried, scored_try=2)
    if cfg.attempts > 2:
        episodes += later_rounds(run, exs, slots, retried, tried, gen)
    return episodes


def episodes_of(run, exs, slots, prefixes, per, retried: Retries, tried, scored_try) -> list[Episode]:
    """A round's episodes: rewards of the retries, advantages per failure's group (of G slots), and the
    trained tokens: the reflection after its prefix (shared by `per` slots), or with --reflection generic
    the retry after its context."""
    cfg, G = run.cfg, run.cfg.num_generations
    queries = [exs[r // G] for r in slots]
    rewards, judged, parts = rewards_of(retried.verdicts, retried.texts, queries, slots, len(exs) * G)
    advantages = advantages_of(cfg, run.d, rewards, judged)
    refl, retries, episodes = retried.reflections, retried.retries, []
    for j, r in enumerate(slots):
        ctx, trained = (prefixes[j // per], refl) if refl else (retried.contexts[j], retries)
        toks = trained.tokens[j]
        text = dict(prompt=exs[r // G].messages[-1]["content"], attempt=tried[r][0],
                    reflection_prompt=tried[r][1], reflection=run.pol.decode(toks) if refl else None,
                    retry_prompt=cfg.retry_prompt, retry=retried.texts[j],
                    feedback=retried.verdicts[j].feedback)
        episodes.append(Episode(id=exs[r // G].id, ids=list(ctx) + list(toks),
                                span=(len(ctx), len(ctx) + len(toks)), reward=rewards[r].item(),
                                truncated=not trained.finished[j],
                                sampled=len(toks) + (len(retries.tokens[j]) if refl else 0), text=text,
                                advantage=advantages[r].item(), judged=bool(judged[r]),
                                scored_try=scored_try, failure=r // G, parts=parts[r]))
    return episodes


def later_rounds(run, exs, slots, retried: Retries, tried, gen) -> list[Episode]:
    """--attempts K > 2: each chain whose retry failed reflects on that retry and retries again, up to K
    tries in all. A reflection's reward is the retry right after it, and its group is the chains of the
    same failure that reached the same try (group_advantages over the failure's G slots, the others left
    out). A failure then costs up to (K - 1) x G reflections and retries in sampled tokens instead of G
    (fewer as retries succeed), each later try prefilled on its own (the G chains no longer share a
    prefix), and the trained sequences grow by a reflection and a retry per try."""
    cfg, G, episodes = run.cfg, run.cfg.num_generations, []
    for k in range(3, cfg.attempts + 1):        # every rank runs every try: advantages_of may all-reduce
        going = judged_failures(retried.verdicts)
        for j in going:       # the retry is now the try reflected on
            shown = reflection_text(cfg, retried.verdicts[j].feedback_to_show())
            tried[slots[j]] = (retried.texts[j], shown)
        prefixes, slots = next_prefixes(cfg, run.pol, retried, going), [slots[j] for j in going]
        queries = [exs[r // G] for r in slots]
        retried = judged_retries(cfg, run.pol, run.task, prefixes, queries, 1, cfg.temperature, gen)
        episodes += episodes_of(run, exs, slots, prefixes, 1, retried, tried, scored_try=k)
    return episodes


def grpo_rollout(run, failures, gen) -> list[Episode]:
    """Plain GRPO (the control): G first attempts at each failure's query, each trained and scored."""
    cfg, pol, G = run.cfg, run.pol, run.cfg.num_generations
    exs = [run.examples[f.id] for f in failures]
    prompts = [chat_ids(pol.tokenizer, ex.messages) for ex in exs]
    attempts = sample(pol.sampler, pol.stops, prompts, cfg, temperature=cfg.temperature, num_samples=G,
                      generator=gen)
    texts = [pol.decode(t) for t in attempts.tokens]
    per_row = [exs[r // G] for r in range(len(texts))]
    verdicts = run.task.check_batch(texts, per_row)
    rewards, judged, parts = rewards_of(verdicts, texts, per_row, list(range(len(verdicts))), len(verdicts))
    advantages = advantages_of(cfg, run.d, rewards, judged)
    return [Episode(id=exs[r // G].id, ids=list(prompts[r // G]) + list(toks),
                    span=(len(prompts[r // G]), len(prompts[r // G]) + len(toks)), reward=rewards[r].item(),
                    truncated=not attempts.finished[r], sampled=len(toks),
                    text=dict(prompt=exs[r // G].messages[-1]["content"], attempt=texts[r], reflection=None,
                              feedback=verdicts[r].feedback),
                    advantage=advantages[r].item(), judged=bool(judged[r]), scored_try=1, failure=r // G,
                    parts=parts[r])
            for r, toks in enumerate(attempts.tokens)]


def step_metrics(run, step, episodes, stats, sample_seconds, train_seconds, part_names=()) -> dict:
    """Global means over all ranks' episodes. `trained_*` describe the trained part: the reflection in RRR.
    Groups are those of the first retry (GRPO's: the attempts); with --attempts > 2, `reward_try<k>` is
    the mean reward of the reflections before try k (`reward`: of all of them); `reward_<name>` for each
    of reward()'s `part_names` (the same on every rank)."""
    cfg, G = run.cfg, run.cfg.num_generations
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
    for name in part_names:
        local[f"reward_{name}"] = sum(e.parts.get(name, 0.0) for e in episodes)
    g = dict(zip(local, par.all_sum(list(local.values()), run.d)))       # summed over the ranks, by name
    n = max(g["episodes"], 1)     # an unjudged episode's reward is 0: the mean reward is over the judged
    return dict(step=step, reward=g["reward"] / max(g["judged"], 1),
                not_judged=int(g["episodes"] - g["judged"]),
                zero_variance_groups=g["flat_groups"] / max(g["first"] / G, 1),
                trained_length=g["trained"] / n, trained_truncated=g["truncated"] / n, **stats,
                sample_tokens_per_s=g["sampled"] / max(sample_seconds, 1e-9),
                train_tokens_per_s=g["tokens"] / max(train_seconds, 1e-9), sample_seconds=sample_seconds,
                train_seconds=train_seconds, step_seconds=sample_seconds + train_seconds,
                **{f"reward_try{k}": g[f"reward_try{k}"] / max(g[f"judged_try{k}"], 1) for k in tries},
                **{f"reward_{name}": g[f"reward_{name}"] / max(g["judged"], 1) for name in part_names})


def train_step(run, failures, step) -> dict:
    """Step 4 once: this step's failures -> rollout -> update; appends its metrics and episodes."""
    cfg, d = run.cfg, run.d

    def draw(index):        # batch `index`'s failures and rollout seed; draw k of step s is s x cap + k's
        return rollout(run, step_batch(cfg, d, failures, index), index)

    t0 = time.time()
    with sampling(run.pol):
        episodes, drawn = (dynamic_sampling(cfg, d, lambda k: draw(step * cfg.max_num_gen_batches + k))
                           if cfg.dynamic_sampling else (draw(step), {}))
    t1 = time.time()
    lr = apply_lr_schedule(run.pol.optimizer, cfg, step, cfg.steps)       # of the step alone: resumes exactly
    stats = dict(grpo_update(cfg, d, run.pol, episodes, trained_length_limit(cfg)), learning_rate=lr)
    everyone = [e for es in par.all_gather_objects(episodes, d) for e in es]       # every rank's, on each
    names = sorted({name for e in everyone for name in e.parts})        # reward()'s parts, if it names them
    row = step_metrics(run, step + 1, episodes, stats, t1 - t0, time.time() - t1, names)
    if drawn:           # the draws' metrics; the sampling throughput counts every draw's tokens
        row |= dict(drawn, sample_tokens_per_s=drawn["sampled_tokens_all_draws"] / max(t1 - t0, 1e-9))
    if d.main:
        append_jsonl(run.out / "metrics.jsonl", [row])
        logged = [{k: v for k, v in asdict(e).items() if k != "failure" and (k != "parts" or v)}
                  for e in everyone[:cfg.log_episodes]]           # `parts` where reward() names them
        append_jsonl(run.out / "episodes.jsonl", [dict(step=step + 1, **e) for e in logged])
    return row


# --- the driver ---------------------------------------------------------------------------------------

def resolve_flags(cfg, out: Path):
    """The model, data folder, run folder, prompts and clip range as used. With resolve_machine_flags and
    policy.resolve_model_flags, every default is applied once, before config.json: it says what ran."""
    task = get_task(cfg.task)
    cfg.model, cfg.data_dir, cfg.out = cfg.model or EMBEDDED_MODEL, data_dir_used(cfg.data_dir), str(out)
    cfg.reflection_prompt = cfg.reflection_prompt or task.reflection_prompt
    cfg.retry_prompt = cfg.retry_prompt or task.retry_prompt
    cfg.epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high


def log_eval(tracker, evals, result):
    evals.append(result)
    tracker.log({"eval/first_try": result["first"], "eval/second_try": result["second"]}, result["step"])


def run(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    out = run_folder(cfg)
    resolve_flags(cfg, out)
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
        resolve_model_flags(cfg, start_from)
        recorded = dict(asdict(cfg), **({"warm_start_model": warm} if warm else {}))
        saved = par.on_rank0(d, prepare_out, out, recorded, cfg.resume)
        par.check_shared_folder(out, d)
        tracker = open_tracker(cfg.report_to, out, asdict(cfg), d.main, project="rrr")
        pol = load_policy(cfg, d, start_from)
        this_run = Run(cfg, d, pol, task, test, {ex.id: ex for ex in train}, out)
        state = par.load_checkpoint(out / "checkpoints", pol.model, pol.optimizer, d) if saved else None
        start = state["step"] if state else 0
        evals, metrics = par.cut_step_logs(d, out, start, STEP_LOGS, {"eval_answers.jsonl": "evals.jsonl"},
                                           keep=("evals.jsonl", "metrics.jsonl"))
        if not evals:
            log_eval(tracker, evals, evaluate(this_run, 0))                                       # 2
        forgetting_before = evaluate_forgetting(this_run, 0)
        failures = build_failure_set(cfg, d, pol, task, train, out)                        # 3
        if not failures:
            raise BadInput("the model solved every training query: no failures to learn from")
        with progress_bar(total=cfg.steps, initial=start, desc="train", disable=not d.main) as bar:
            for step in range(start, cfg.steps):                                                   # 4
                metrics.append(train_step(this_run, failures, step))
                tracker.log(metrics[-1], metrics[-1]["step"])
                bar.update()
                bar.set_postfix(reward=f"{metrics[-1]['reward']:.2f}", loss=f"{metrics[-1]['loss']:.4f}")
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                    log_eval(tracker, evals, evaluate(this_run, step + 1))                         # 5
                if cfg.save_every and (step + 1) % cfg.save_every == 0:
                    par.save_checkpoint(out / "checkpoints", step + 1, pol.model, pol.optimizer, dict(), d,
                                        save_total_limit=cfg.save_total_limit)
        if evals[-1]["step"] != cfg.steps:
            log_eval(tracker, evals, evaluate(this_run, cfg.steps))                                # 5
        forgetting_after = evaluate_forgetting(this_run, cfg.steps)
        if d.main:
            split_size = test_split_size(task, cfg.data_dir, cfg.seed, cfg.eval_split)
            forgetting = {k: (forgetting_before[k], forgetting_after[k]) for k in forgetting_before}
            wall = time.time() - started
            table = write_rrr_report(recorded, out, evals, metrics, wall, split_size, forgetting)
            print(f"\n{table}\n\nreport: {out / 'report.md'}")
        par.export_hf(pol.model, pol.tokenizer, out / "final", d)
        if cfg.use_peft:
            lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, targets=cfg.lora_target_modules)
            par.export_adapters(pol.model, out / "adapters.safetensors", lora, d)
    finally:
        tracker.close()
        par.close_distributed()


if __name__ == "__main__":
    main_guard(run)
