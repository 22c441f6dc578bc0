"""Re-ReST (Dou et al. 2024): reflection-reinforced self-training, as one run that prints the ablation table.

    python rerest.py --task mbpp          # embedded SmolLM2-135M, 2-core CPU: 9.2 min fp32 (A), 5.6 bf16 (B)
    python rerest.py --task mbpp --train-reflector --dpo           # every row of the table
    torchrun --nproc_per_node=8 rerest.py --task mbpp --model codellama/CodeLlama-13b-Instruct-hf

The algorithm, one function per step, in the order run() calls them (docs/rerest.md details each):
  1. sample_solutions   --k solutions per training problem, verified: the passing ones form D_M
  2. reflect            the reflector corrects failed ones from the verifier's feedback: D_R, those that pass
  3. train_reflector    --train-reflector: fine-tune the reflector on D_R, then reflect again
  4. train_agents       from the base model: on D_M (self-training), D_M + D_R (Re-ReST), --dpo on dpo_pairs
  5. evaluate_rows      greedy pass@1 per test problem (evaluate); --self-consistency N adds a vote that is
                        not blind on MBPP: the prompts hold the asserts' expected values (self_consistency)

Every stage keeps its results under --out, named by a hash of the settings it reads (CACHE_KEYS): a run with
other flags for a later stage reuses the earlier stages, and an interrupted run picks up where it stopped.
Nothing is overwritten but the `final` link.

Simplifications: one reflection round; at most --reflections-per-problem failed samples of a problem are
corrected; the reflector is prompted zero-shot unless --train-reflector; D_M keeps every passing sample,
duplicates included.
"""

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import sandbox
from data import Task, data_dir_used, load_splits, reflector_messages, resolve_data_dir, test_split_size
from data.countdown import check_warm_start
from runs import (LR_SCHEDULER_TYPES, REPORT_TO, BadInput, MachineFlags, Tracker, announce, append_jsonl,
                  check_at_least, check_lr_schedule, check_model_name, flag, main_guard, open_tracker,
                  parse_config, resolve_machine_flags)

DEFAULT_OUT = "runs/rerest-{task}"
MODELS = "models"                       # <out>/models/<row>-<hash>: each trained model, Hugging Face format
FINAL = "final"                         # <out>/final: a relative link to the Re-ReST agent's folder
BASE, SELF_TRAINING, RE_REST = "base", "self-training", "Re-ReST"
WITH_TRAINED_REFLECTOR, DPO = "Re-ReST + trained reflector", "DPO"      # the table's rows, in this order
ZERO_SHOT, TRAINED = "zero-shot", "trained"                             # the reflectors' names in cache files
NO_DATA = "no training data (no passing solutions)"
NO_REFLECTOR_DATA = "no passing corrections to train the reflector on"

# What each stage's results depend on, hashed in this order into its file's (or model folder's) name by
# stage_hash: a Config field, else a value the stage passes. A setting a stage starts to read belongs here
# (which renames, so invalidates, that stage's caches); reordering renames them for nothing.
CACHE_KEYS = {
    "samples": ("task", "model", "data_dir", "train_size", "seed", "k", "temperature",
                "max_completion_length"),
    "reflections": ("reflector_id", "reflections_per_problem", "max_completion_length", "failed_texts"),
    "model": ("kind", "init", "lora_r", "lora_alpha", "epochs", "learning_rate", "lr_scheduler_type",
              "warmup_ratio", "batch_size", "seed", "dpo_beta", "bf16",
              "data"),      # data: the token ids; an SFT model passes dpo_beta=None
    "eval": ("model_id", "task", "data_dir", "eval_size", "max_completion_length"),
    "sc": ("model_id", "task", "data_dir", "eval_size", "max_completion_length", "self_consistency",
           "temperature", "seed", "reflector_id"),
}


@dataclass
class Config(MachineFlags):     # + --bf16, --gradient-checkpointing, --cuda-graphs, --device
    task: str = flag("mbpp", "task", choices=["mbpp", "countdown", "countdown_easy", "function_calling"])
    model: str | None = flag(None, "agent: Hugging Face model folder or hub id (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    warm_start: int = flag(0, "Countdown tasks: first fine-tune --model on this many solver-written answers "
                           "(warmstart.py, rrr.py's flag; cached): the agent (and the reflector, unless "
                           "--reflector-model) starts from it, as the report says (0: none)")
    warm_start_reflections: bool = flag(False, "with --warm-start: the labels also cover the reflection turn "
                                        "(warmstart.py --reflections)")
    reflector_model: str | None = flag(None, "reflector (default: the agent's base model, reflector prompt)")
    data_dir: str | None = flag(None, "folder with the real data sets (mbpp/, countdown/, function_calling/);"
                                " default $RRR_DATA_DIR, else the small offline samples")
    out: str | None = flag(None, "run folder and cache of every stage (default runs/rerest-<task>)")
    k: int = flag(4, "solutions sampled per training problem")
    train_size: int = flag(40, "training problems")
    eval_size: int = flag(40, "test problems")
    max_completion_length: int = flag(256, "tokens per solution")
    temperature: float = flag(0.8, "sampling temperature of the agent's solutions")
    reflections_per_problem: int = flag(2, "failed samples per problem that the reflector corrects, at most")
    train_reflector: bool = flag(False, "also fine-tune the reflector on its passing corrections (row "
                                 "'Re-ReST + trained reflector')")
    dpo: bool = flag(False, "also train with DPO, the base model as reference: each failed sample against "
                     "its own passing correction, else against a passing sample of the same problem")
    dpo_beta: float = flag(0.1, "DPO inverse temperature beta")
    lora_r: int = flag(8, "LoRA rank on q_proj and v_proj, as in the released code (0: full fine-tuning)")
    lora_alpha: float = flag(16.0, "LoRA alpha: the update is scaled by alpha / r")
    epochs: int = flag(3, "passes over each training set")
    learning_rate: float = flag(1e-4, "AdamW learning rate")
    lr_scheduler_type: str = flag("constant", "learning-rate schedule over each model's optimizer steps, as "
                                  "transformers' (TRL's flag): linear or cosine decay to 0",
                                  choices=list(LR_SCHEDULER_TYPES))
    warmup_ratio: float = flag(0.0, "linear or cosine: the first ceil(this x the steps) optimizer steps rise "
                               "linearly from 0 (TRL's flag; in [0, 1))")
    batch_size: int = flag(8, "sequences (DPO: pairs) per optimizer step over all ranks (a multiple of them)")
    micro_batch_size: int = flag(4, "sequences (DPO: pairs) per forward/backward pass")
    sampling_batch_size: int = flag(16, "problems per rank in one sampling call (a call covers this x ranks "
                                    "problems, so every rank has work)")
    self_consistency: int = flag(0, "mbpp: also majority-vote N samples per test problem, each revised by "
                                 "the reflector (0: off); not blind: the prompts hold the asserts' expected "
                                 "values")
    require_isolation: bool = flag(False, "mbpp: refuse to start when the code sandbox cannot isolate "
                                   "programs (no bubblewrap or namespaces) instead of using limits only")
    save_total_limit: int = flag(1, "checkpoints (one per epoch) kept per trained model while it trains, "
                                 "the newest; by default only the last")
    report_to: str = flag("none", "where the table's pass@1 also goes: tensorboard writes <out>/tensorboard; "
                          "wandb logs to Weights & Biases", choices=list(REPORT_TO))
    seed: int = flag(0, "seed for sampling, data order and LoRA init")


def check_flags(cfg):
    """Everything that can be refused before the run folder is touched, each in one line."""
    check_at_least(cfg, ("k", "train_size", "eval_size", "max_completion_length", "epochs", "batch_size",
                         "micro_batch_size", "reflections_per_problem", "sampling_batch_size",
                         "save_total_limit"), 1)
    check_at_least(cfg, ("temperature", "dpo_beta", "lora_r", "lora_alpha", "learning_rate",
                         "self_consistency"), 0)
    check_lr_schedule(cfg)
    if cfg.self_consistency and cfg.task != "mbpp":
        raise BadInput("--self-consistency votes by program outputs: it needs --task mbpp")
    check_model_name(cfg.model)
    check_warm_start(cfg.task, cfg.warm_start, cfg.warm_start_reflections)
    if cfg.reflector_model is not None:
        check_model_name(cfg.reflector_model)
    resolve_data_dir(cfg.data_dir)
    if cfg.task == "mbpp" and cfg.require_isolation and not sandbox.isolation()[0]:
        raise BadInput(sandbox.isolation()[1] + " (--require-isolation)")


if __name__ == "__main__":      # a bad flag fails here, in a fraction of a second, before torch loads (3-5 s)
    main_guard(lambda argv: check_flags(parse_config(Config, argv, description=__doc__)))

# torch and the modules that load it come after the early check of the command line, on purpose.
import torch

import parallel as par
from finetune import sft_data, train_model
from model import chat_ids, load_model, stop_token_ids
from warmstart import model_for_run
from policy import resolve_gradient_checkpointing, sample
from report import recorded_config, write_rerest_report
from verifiers import code_outputs_batch


# --- what the steps share: the run's Setup, the stage cache, sampling ---------------------------------
@dataclass
class Setup:
    """What every step reads: flags, ranks, run folder, task and examples, the base models."""
    cfg: Config
    d: par.Dist
    out: Path
    task: Task
    train: list
    test: list
    split_size: int | None          # the whole test split's, for the report's "40 of 500" (rank 0)
    examples: dict                  # the training problems by id
    tok: object
    agent: torch.nn.Module          # the base model
    reflector: torch.nn.Module      # the zero-shot reflector: the agent itself unless --reflector-model
    reflector_id: str | None        # what it was loaded from: --reflector-model, else --model


@dataclass
class Stage:
    """A stage's rows (samples, or corrections) and its wall time, counted into the rows trained on them."""
    rows: list[dict]
    seconds: float


def settings_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def stage_hash(cfg, stage: str, **inputs) -> str:
    return settings_hash(*(inputs[key] if key in inputs else getattr(cfg, key) for key in CACHE_KEYS[stage]))


def cached_rows(s: Setup, stage: str, name: str | None, items: list[tuple[str, object]], work, desc: str,
                rows_per_item: int = 1, **inputs) -> list[dict]:
    """A stage's rows, kept in <out>/<stage>[-<name>]-<stage_hash>.jsonl and resumed chunk by chunk
    (par.resumable_chunks): items are (key, payload); work(keys, payloads) makes rows_per_item rows per
    item, each with its item's "key". In item order."""
    file = "-".join(filter(None, (stage, name, stage_hash(s.cfg, stage, **inputs)))) + ".jsonl"
    done = par.resumable_chunks(s.out / file, items, lambda number, keys, payloads: work(keys, payloads), s.d,
                                per_rank=s.cfg.sampling_batch_size, desc=desc, rows_per_item=rows_per_item)
    return [r for k, _ in items for r in done[k]]


def generate(s: Setup, model, chats: list, seed_keys=None, **sampling) -> list[list[int]]:
    """The completions' token ids, num_samples per chat, one chat's after another. seed_keys (a chunk's
    items) seed the generator with the run's seed: a chunk draws the same samples however the run was cut."""
    if seed_keys is not None:
        seed = int(settings_hash(s.cfg.seed, seed_keys), 16)
        sampling["generator"] = torch.Generator(s.d.device).manual_seed(seed)
    prompts = [chat_ids(s.tok, chat) for chat in chats]
    return sample(model, stop_token_ids(s.tok, model), prompts, s.cfg, **sampling).tokens


def decode(s: Setup, tokens: list[list[int]]) -> list[str]:
    return [s.tok.decode(t, skip_special_tokens=True) for t in tokens]


def verified(s: Setup, keys: list[str], tokens: list[list[int]], examples: list, extras=None) -> list[dict]:
    """A row per solution with the verifier's verdict and feedback, and its `extras`. base: MBPP's own tests
    alone; judged False: the sandbox could not run it (no success, failure or test result)."""
    texts = decode(s, tokens)
    verdicts = s.task.check_batch(texts, examples)
    return [dict(key=key, tokens=t, text=text, ok=v.ok, feedback=v.feedback,
                 **({} if v.base is None else dict(base=v.base)), **({"judged": False} if v.infra else {}),
                 **extra)
            for key, t, text, v, extra in zip(keys, tokens, texts, verdicts, extras or [{}] * len(keys))]


def sample_key(sample: dict) -> str:
    # a reflection row's key is its failed sample's: how DPO finds a failed sample's own correction
    return f"{sample['key']}/{sample['j']}"


def is_failure(row: dict) -> bool:
    return not row["ok"] and row.get("judged", True)


def passing(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["ok"]]


# --- 1. sample and verify -----------------------------------------------------------------------------
@torch.no_grad()
def sample_solutions(s: Setup) -> list[dict]:
    k = s.cfg.k

    def work(keys, examples):
        tokens = generate(s, s.agent, [ex.messages for ex in examples], keys, temperature=s.cfg.temperature,
                          num_samples=k)
        repeated = [ex for ex in examples for _ in range(k)]
        indices = [dict(j=j) for _ in examples for j in range(k)]
        return verified(s, [ex.id for ex in repeated], tokens, repeated, indices)

    return cached_rows(s, "samples", None, [(ex.id, ex) for ex in s.train], work, "1 sample + verify", k)


# --- 2. reflect ---------------------------------------------------------------------------------------
@torch.no_grad()
def reflect(s: Setup, samples: list[dict], reflector, name: str, reflector_id: str | None) -> list[dict]:
    """The reflector corrects failed samples from their feedback (greedy); each correction is verified."""
    failed, per_problem = [], Counter()
    for r in samples:
        if is_failure(r) and per_problem[r["key"]] < s.cfg.reflections_per_problem:
            per_problem[r["key"]] += 1
            failed.append(r)

    def work(keys, fails):
        exs = [s.examples[f["key"]] for f in fails]
        chats = [reflector_messages(s.task, ex, f["text"], f["feedback"]) for ex, f in zip(exs, fails)]
        return verified(s, keys, generate(s, reflector, chats, temperature=0), exs,
                        [dict(id=f["key"], failed=f["text"], failed_feedback=f["feedback"]) for f in fails])

    items = [(sample_key(f), f) for f in failed]
    return cached_rows(s, "reflections", name, items, work, f"2 reflect ({name})", reflector_id=reflector_id,
                       failed_texts=[f["text"] for f in failed])


# --- 3. train the reflector ---------------------------------------------------------------------------
def model_folder(s: Setup, name: str, init: str | None, data: list, kind: str = "sft") -> Path:
    """<out>/models/<name>-<hash>: other data or training flags train (and evaluate) a new model."""
    no_beta = {} if kind == "dpo" else dict(dpo_beta=None)
    h = stage_hash(s.cfg, "model", kind=kind, init=init, data=data, **no_beta)
    folder = s.out / MODELS / f"{name}-{h}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def train_reflector(s: Setup, samples: Stage, zero_shot: Stage) -> Stage:
    """Supervised fine-tuning of the reflector on (problem, failed solution, feedback) -> its passing
    correction, then reflect again with it; timed from the zero-shot reflection on. No rows: there was no
    passing correction to learn from, and no reflector is trained."""
    t = time.time()
    pairs = sft_data(s.tok, passing(zero_shot.rows), lambda r: reflector_messages(
        s.task, s.examples[r["id"]], r["failed"], r["failed_feedback"]))
    if not pairs:
        return Stage([], zero_shot.seconds + time.time() - t)
    folder = model_folder(s, "reflector", s.reflector_id, pairs)
    with par.off_device(s.agent, s.reflector):     # one model at a time on the device
        train_model(s.cfg, s.d, s.reflector_id, pairs, folder)
    model, _ = load_model(str(folder), device=s.d.device)
    return Stage(reflect(s, samples.rows, model, TRAINED, str(folder)), zero_shot.seconds + time.time() - t)


# --- 4. train the agents ------------------------------------------------------------------------------
def dpo_pairs(samples, d_m, d_r) -> tuple[list[tuple[dict, dict]], dict]:
    """Re-ReST's DPO pairs as (chosen, rejected) rows, in sample order. Each failed sample is rejected
    against its own correction: the passing reflector output for that very sample, from D_R. Only a failed
    sample without one (not corrected, or its correction failed) is paired with a passing sample of the same
    problem from D_M, the problem's passing samples taken in turn so the fallbacks spread over them; with
    neither it is left out. Counts: pairs, own_correction, fallback, unpaired (failed samples left out)."""
    own = {r["key"]: r for r in d_r}            # a reflection's key is its failed sample's sample_key
    pool_of, pairs, counts, turn = {}, [], dict(own_correction=0, fallback=0, unpaired=0), Counter()
    for r in d_m:
        pool_of.setdefault(r["key"], []).append(r)
    for failed in filter(is_failure, samples):
        key, pool = failed["key"], pool_of.get(failed["key"])
        kind = "own_correction" if sample_key(failed) in own else "fallback" if pool else "unpaired"
        counts[kind] += 1
        if kind != "unpaired":
            chosen = own[sample_key(failed)] if kind == "own_correction" else pool[turn[key] % len(pool)]
            pairs.append((chosen, failed))
        turn[key] += kind == "fallback"
    return pairs, dict(pairs=len(pairs), **counts)


def train_agents(s: Setup, samples: Stage, zero_shot: Stage,
                 trained_reflector: Stage | None) -> tuple[dict[str, dict], dict[str, tuple], dict | None]:
    """The table's trained rows in its order, each {"folder"} or {"note"} (nothing to train on) with its
    "time" (its data's stages and its training); their data's sizes (D_M, D_R); with --dpo dpo_pairs'
    counts. trained_reflector: train_reflector's corrections (None without --train-reflector; no rows: no
    reflector was trained). DPO's chosen corrections are the trained reflector's with --train-reflector."""
    d_m, d_r, corrections, rows, sizes = passing(samples.rows), passing(zero_shot.rows), zero_shot, {}, {}

    def train(name: str, data: list, d_r_used: list, data_seconds: float, kind: str = "sft"):
        t = time.time()
        sizes[name] = (len(d_m), len(d_r_used))
        if not data:
            rows[name] = dict(time=data_seconds, note=NO_DATA)
            return
        folder = model_folder(s, name.replace(" ", "_").replace("+", "and"), s.cfg.model, data, kind)
        with par.off_device(s.agent, s.reflector):      # one model at a time on the device
            train_model(s.cfg, s.d, s.cfg.model, data, folder, kind)
        rows[name] = dict(folder=folder, time=data_seconds + time.time() - t)

    def sft(solutions):
        return sft_data(s.tok, solutions, lambda r: s.examples[r["id"] if "id" in r else r["key"]].messages)

    train(SELF_TRAINING, sft(d_m), [], samples.seconds)
    train(RE_REST, sft(d_m + d_r), d_r, samples.seconds + zero_shot.seconds)
    if trained_reflector and not trained_reflector.rows:
        rows[WITH_TRAINED_REFLECTOR] = dict(time=trained_reflector.seconds, note=NO_REFLECTOR_DATA)
        sizes[WITH_TRAINED_REFLECTOR] = (len(d_m), 0)
    elif trained_reflector:
        corrections, d_r = trained_reflector, passing(trained_reflector.rows)
        train(WITH_TRAINED_REFLECTOR, sft(d_m + d_r), d_r, samples.seconds + trained_reflector.seconds)
    if not s.cfg.dpo:
        return rows, sizes, None
    pairs, counts = dpo_pairs(samples.rows, d_m, d_r)
    triples = [(prompt, chosen, rejected) for (prompt, chosen), (_, rejected) in map(sft, pairs)]
    train(DPO, triples, d_r, samples.seconds + corrections.seconds, "dpo")
    return rows, sizes, counts


# --- 5. evaluate --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(s: Setup, model, name: str, model_id: str | None) -> list[dict]:
    """Greedy pass@1: each test problem's row, so that the table's rows compare problem by problem."""
    def work(keys, exs):
        return verified(s, keys, generate(s, model, [ex.messages for ex in exs], temperature=0), exs)

    return cached_rows(s, "eval", name, [(ex.id, ex) for ex in s.test], work, f"5 eval {name}",
                       model_id=model_id)


def per_item(rows, field: str = "ok") -> dict[str, bool] | None:
    """{test problem key: passed} from rows that say `field` ("base": MBPP's own tests alone; None when none
    does). A key written twice (two runs appending to one cache) keeps its first judged row."""
    items = {}
    for r in rows:
        if r.get("judged", True) and field in r:
            items.setdefault(r["key"], bool(r[field]))
    return items if items or field == "ok" else None


@torch.no_grad()
def self_consistency(s: Setup, model, name: str, model_id: str | None) -> dict[str, bool]:
    """mbpp: N samples per problem, each revised once by the zero-shot reflector (greedy), grouped by their
    outputs on the test inputs; the largest group's first program (tie: the group met first) is scored.
    Not a blind test-time method on MBPP: the reflector sees the problem prompt, which holds the asserts
    with their expected values, and the sample's outputs on the test inputs (no pass/fail marks; every
    reflector input is called a failed attempt); the vote sees only the revised programs' outputs."""
    n = s.cfg.self_consistency

    def outputs(texts, exs):
        return code_outputs_batch([(t, ex.reference["tests"], ex.reference.get("setup", ""))
                                   for t, ex in zip(texts, exs)])

    def work(keys, examples):
        tokens = generate(s, model, [ex.messages for ex in examples], keys, temperature=s.cfg.temperature,
                          num_samples=n)
        exs = [ex for ex in examples for _ in range(n)]
        texts = decode(s, tokens)
        notes = ["Outputs of the program on the test inputs: " + "; ".join(o) for o in outputs(texts, exs)]
        chats = [reflector_messages(s.task, ex, t, note) for ex, t, note in zip(exs, texts, notes)]
        revised = decode(s, generate(s, s.reflector, chats, temperature=0))
        votes = outputs(revised, exs)
        groups = [[tuple(v) for v in votes[i * n:(i + 1) * n]] for i in range(len(examples))]
        chosen = [revised[i * n + g.index(Counter(g).most_common(1)[0][0])] for i, g in enumerate(groups)]
        verdicts = s.task.check_batch(chosen, examples)
        return [dict(key=key, ok=v.ok, text=text, **({"judged": False} if v.infra else {}))
                for key, text, v in zip(keys, chosen, verdicts)]

    return per_item(cached_rows(s, "sc", name, [(ex.id, ex) for ex in s.test], work,
                                f"5 self-consistency {name}", model_id=model_id, reflector_id=s.reflector_id))


def evaluate_rows(s: Setup, trained: dict[str, dict]) -> dict[str, dict]:
    """The table's rows as report reads them, base first (one trained model on the device at a time):
    items (pass@1 per test problem), sc_items with --self-consistency, time (with the evaluation's)."""
    def row(model, name, model_id, seconds):
        t = time.time()
        answers = evaluate(s, model, name, model_id)
        items = per_item(answers)
        got = dict(items=items, base_items=per_item(answers, "base"), not_judged=len(s.test) - len(items))
        if s.cfg.self_consistency:
            got["sc_items"] = self_consistency(s, model, name, model_id)
        return dict(got, time=seconds + time.time() - t)

    rows = {BASE: row(s.agent, BASE, s.cfg.model, 0.0)}
    for name, r in trained.items():
        if "folder" not in r:
            rows[name] = dict(items=None, **r)
            continue
        model, _ = load_model(str(r["folder"]), device=s.d.device)
        rows[name] = dict(folder=str(r["folder"]), **row(model, name, str(r["folder"]), r["time"]))
        del model
    return rows


# --- run(): the driver --------------------------------------------------------------------------------
def setup(cfg, d, out: Path) -> Setup:
    """The data, the run folder (with a line in invocations.jsonl per run) and the base models."""
    task, train, test = load_splits(cfg.task, cfg.data_dir, cfg.train_size, cfg.eval_size, cfg.seed)
    split_size = test_split_size(task, cfg.data_dir, cfg.seed) if d.main else None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    par.check_shared_folder(out, d)
    agent, tok = load_model(cfg.model, device=d.device)
    reflector = agent if cfg.reflector_model is None else load_model(cfg.reflector_model, device=d.device)[0]
    if d.main:
        append_jsonl(out / "invocations.jsonl", [dict(recorded_config(cfg, out), time=time.time())])
    return Setup(cfg, d, out, task, train, test, split_size, {ex.id: ex for ex in train}, tok, agent,
                 reflector, cfg.reflector_model or cfg.model)


def run(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    if cfg.task == "mbpp" and os.environ.get("RANK", "0") == "0":
        print(sandbox.isolation()[1], flush=True)      # whether programs run isolated, or with limits only
    out = Path(cfg.out or DEFAULT_OUT.format(task=cfg.task))
    cfg.data_dir = data_dir_used(cfg.data_dir)     # the folder used ($RRR_DATA_DIR too): recorded and hashed
    announce(out, cfg, ("task", "model", "reflector_model", "k", "train_size", "eval_size", "epochs",
                        "learning_rate", "train_reflector", "self_consistency"))
    d, tracker = par.init_distributed(cfg.device), Tracker()
    try:
        resolve_machine_flags(cfg, d)
        if cfg.warm_start:      # the labelled warm start (built once, cached) is the base model from here on
            cfg.model, _ = model_for_run(cfg, d)
        resolve_gradient_checkpointing(cfg)      # before the run records its settings
        s = setup(cfg, d, out)
        tracker = open_tracker(cfg.report_to, out, recorded_config(cfg, out), d.main, project="rerest")
        t = time.time()
        samples = Stage(sample_solutions(s), time.time() - t)                                         # 1
        t = time.time()
        zero_shot = Stage(reflect(s, samples.rows, s.reflector, ZERO_SHOT, s.reflector_id),          # 2
                          time.time() - t)
        trained_reflector = train_reflector(s, samples, zero_shot) if cfg.train_reflector else None    # 3
        trained, sizes, dpo = train_agents(s, samples, zero_shot, trained_reflector)                  # 4
        rows = evaluate_rows(s, trained)                                                              # 5
        table = write_rerest_report(cfg, out, rows, sizes, s.split_size, dpo, d.main)
        tracker.log({f"pass1/{name}": sum(r["items"].values()) / len(r["items"])
                     for name, r in rows.items() if r["items"]}, 0)
        re_rest = trained[RE_REST].get("folder")
        if d.main and re_rest:        # <out>/final: the Re-ReST agent, a relative link that moves with <out>
            link = out / (FINAL + ".tmp")
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(re_rest, out), target_is_directory=True)
            link.replace(out / FINAL)
        if d.main:
            print(f"\n{table}\n\nreport: {out / 'report.md'}")
    finally:
        tracker.close()
        par.close_distributed()


if __name__ == "__main__":
    main_guard(run)
