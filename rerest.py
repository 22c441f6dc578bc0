"""Re-ReST (Dou et al. 2024): reflection-reinforced self-training, as one run that prints the ablation table.

    python rerest.py --task mbpp                                   # embedded SmolLM2-135M, 2-core CPU, ~9 min
    python rerest.py --task mbpp --train-reflector --dpo           # every row of the table
    torchrun --nproc_per_node=8 rerest.py --task mbpp --model codellama/CodeLlama-13b-Instruct-hf ...

The algorithm, one function per step, in the order run() calls them (the README lists the same steps):
  1. sample_solutions   the agent draws --k solutions per training problem, and the task's verifier runs
                        each: passing ones form D_M; failing ones keep the verifier's feedback (which
                        asserts passed, which failed, with the actual output)
  2. reflect            the reflector gets (problem, failed solution, feedback) and writes a corrected
                        solution; the corrections that pass form D_R
  3. train_reflector    --train-reflector: fine-tune the reflector (train_model) on (problem, failure,
                        feedback) -> passing correction, then reflect again with it
  4. train_agents       the agent, from the base model (train_model): on D_M (self-training), on D_M + D_R
                        (Re-ReST), and with --dpo on pairs (dpo_pairs): each failed sample is rejected against
                        its own correction from D_R (the trained reflector's with --train-reflector), or, only
                        when it has none, against a passing sample of the same problem from D_M; the loss
                        covers solution tokens only; full fine-tuning, or LoRA (--lora-r) merged on export
  5. evaluate_rows      greedy pass@1 per test problem (evaluate) of the base model and each trained agent;
                        report gives each row its 95% Wilson interval and its paired change from "base"
                        (exact McNemar). --self-consistency N adds a vote that is not blind on MBPP: the
                        prompts hold the asserts' expected values (self_consistency)

Every stage writes its results under --out in a file whose name carries a hash of the settings it depends
on, so a run with other flags for a later stage reuses the earlier stages, and an interrupted run picks up
where it stopped. Nothing is overwritten but the `final` link.

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
from runs import (REPORT_TO, BadInput, MachineFlags, Tracker, append_jsonl, check_at_least, check_model_name, flag,
                  announce, main_guard, open_tracker, parse_config, resolve_machine_flags)

# --- constants and flags ------------------------------------------------------------------------------

DEFAULT_OUT = "runs/rerest-{task}"
MODELS = "models"                       # <out>/models/<row>-<hash>: each trained model, Hugging Face format
FINAL = "final"                         # <out>/final: a relative link to the Re-ReST agent's folder
BASE, SELF_TRAINING, RE_REST = "base", "self-training", "Re-ReST"
WITH_TRAINED_REFLECTOR, DPO = "Re-ReST + trained reflector", "DPO"      # the table's rows, in this order
ZERO_SHOT, TRAINED = "zero-shot", "trained"                             # the reflectors' names in cache files
NO_DATA = "no training data (no passing solutions)"
NO_REFLECTOR_DATA = "no passing corrections to train the reflector on"
AT_LEAST_ONE = ("k", "train_size", "eval_size", "max_completion_length", "epochs", "batch_size", "micro_batch_size",
                "reflections_per_problem", "sampling_batch_size", "save_total_limit")
NOT_NEGATIVE = ("temperature", "dpo_beta", "lora_r", "lora_alpha", "learning_rate", "self_consistency")


@dataclass
class Config(MachineFlags):     # + --bf16, --gradient-checkpointing, --cuda-graphs, --device
    task: str = flag("mbpp", "task", choices=["mbpp", "countdown", "function_calling"])
    model: str | None = flag(None, "agent: Hugging Face model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    reflector_model: str | None = flag(None, "reflector (default: the agent's base model with the reflector prompt)")
    data_dir: str | None = flag(None, "folder with the real data sets (mbpp/, countdown/, function_calling/); default "
                                "$RRR_DATA_DIR, else the small offline samples")
    out: str | None = flag(None, "run folder and cache of every stage (default runs/rerest-<task>)")
    k: int = flag(4, "solutions sampled per training problem")
    train_size: int = flag(40, "training problems")
    eval_size: int = flag(40, "test problems")
    max_completion_length: int = flag(256, "tokens per solution")
    temperature: float = flag(0.8, "sampling temperature of the agent's solutions")
    reflections_per_problem: int = flag(2, "failed samples per problem that the reflector corrects, at most")
    train_reflector: bool = flag(False, "also fine-tune the reflector on its passing corrections (row 'Re-ReST + trained reflector')")
    dpo: bool = flag(False, "also train with DPO, the base model as reference: each failed sample (rejected) against its "
                     "own passing correction from D_R (chosen), else against a passing sample of the same problem")
    dpo_beta: float = flag(0.1, "DPO inverse temperature beta")
    lora_r: int = flag(8, "LoRA rank on q_proj and v_proj, as in the released Re-ReST code (0: full fine-tuning)")
    lora_alpha: float = flag(16.0, "LoRA alpha: the update is scaled by alpha / r")
    epochs: int = flag(3, "passes over each training set")
    learning_rate: float = flag(1e-4, "AdamW learning rate")
    batch_size: int = flag(8, "sequences (DPO: pairs) per optimizer step over all ranks (a multiple of the ranks)")
    micro_batch_size: int = flag(4, "sequences (DPO: pairs) per forward/backward pass")
    sampling_batch_size: int = flag(16, "problems per rank in one sampling call of a stage (a call covers this x "
                                    "ranks problems, so every rank has work)")
    self_consistency: int = flag(0, "mbpp: also sample N solutions per test problem, let the reflector revise each from the "
                                 "problem prompt (which holds the asserts with their expected values) and the program's outputs "
                                 "on the test inputs, and majority-vote by the revised programs' outputs on those inputs (0: off)")
    require_isolation: bool = flag(False, "mbpp: refuse to start when the code sandbox cannot isolate programs "
                                   "(bubblewrap missing or no namespaces) instead of running them with process limits only")
    save_total_limit: int = flag(2, "checkpoints (one per epoch) kept per trained model while it trains, the "
                                 "newest (TRL's name); 1 keeps only the last")
    report_to: str = flag("none", "where the table's pass@1 also goes (TRL's name): tensorboard writes "
                          "<out>/tensorboard; wandb logs to Weights & Biases", choices=list(REPORT_TO))
    seed: int = flag(0, "seed for sampling, data order and LoRA init")


def check_flags(cfg):
    """Everything that can be refused before the run folder is touched, each in one line."""
    check_at_least(cfg, AT_LEAST_ONE, 1)
    check_at_least(cfg, NOT_NEGATIVE, 0)
    if cfg.self_consistency and cfg.task != "mbpp":
        raise BadInput("--self-consistency votes by program outputs: it needs --task mbpp")
    check_model_name(cfg.model)
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
from policy import sample
from rerest_report import recorded_config, write_report


# --- what the steps share: sampling, the stage cache, the step data -----------------------------------

def settings_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def seeded(d, seed: int, keys: list[str]) -> torch.Generator:
    """A sampling generator seeded by the run's seed and the chunk's items: the same chunk draws the same
    samples however the run was interrupted."""
    return torch.Generator(d.device).manual_seed(int(settings_hash(seed, keys), 16))


def run_cached(path: Path, items: list[tuple[str, object]], work, d, desc: str, per_rank: int,
               rows_per_item: int = 1) -> list[dict]:
    """A stage cached in `path` and resumable chunk by chunk (par.resumable_chunks): items are (key,
    payload); work(keys, payloads) returns rows_per_item rows per item, each with its item's "key".
    Returns the rows of all items in item order."""
    done = par.resumable_chunks(path, items, lambda number, keys, payloads: work(keys, payloads), d,
                                per_rank=per_rank, desc=desc, rows_per_item=rows_per_item)
    return [r for k, _ in items for r in done[k]]


def sample_key(sample: dict) -> str:
    """The key of a sampled solution, "<problem id>/<sample index>": a reflection row carries its failed
    sample's, which is how DPO finds a failed sample's own correction."""
    return f"{sample['key']}/{sample['j']}"


def solution_row(tok, key, tokens, verdict, **extra):
    # base: MBPP's own tests alone; judged False: the sandbox could not run it (no success, failure or test result)
    return dict(key=key, tokens=tokens, text=tok.decode(tokens, skip_special_tokens=True), ok=verdict.ok,
                feedback=verdict.feedback, **({} if verdict.base is None else dict(base=verdict.base)),
                **({"judged": False} if verdict.infra else {}), **extra)


def is_failure(s: dict) -> bool:
    return not s["ok"] and s.get("judged", True)


def passing(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["ok"]]


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
    """A sampling stage's rows (samples, or corrections) and its wall time."""
    rows: list[dict]
    seconds: float


def timed(stage, *args) -> Stage:
    """Runs a sampling stage (steps 1-2), timed."""
    t = time.time()
    return Stage(stage(*args), time.time() - t)


@dataclass
class TrainedReflector:
    """Step 3: the trained reflector (None: it had no passing corrections to learn from) and its corrections
    (D_R = their passing rows; their time includes the zero-shot reflection and the training)."""
    model: torch.nn.Module | None
    corrections: Stage


@dataclass
class Agent:
    """Step 4, one per trained row: its model folder (None: nothing to train on, said by `note`), the
    training time plus the stages its data rests on, and its data's sizes (D_M, D_R)."""
    name: str
    folder: Path | None
    seconds: float
    sizes: tuple[int, int]
    note: str = NO_DATA


# --- 1. sample and verify -----------------------------------------------------------------------------

@torch.no_grad()
def sample_solutions(cfg, d, agent, tok, task, train, out) -> list[dict]:
    """k solutions per training problem, each with the verifier's verdict and feedback."""
    h = settings_hash(cfg.task, cfg.model, cfg.data_dir, cfg.train_size, cfg.seed, cfg.k, cfg.temperature,
                      cfg.max_completion_length)

    def work(keys, examples):
        gen = sample(agent, stop_token_ids(tok, agent), [chat_ids(tok, ex.messages) for ex in examples], cfg,
                     temperature=cfg.temperature, num_samples=cfg.k, generator=seeded(d, cfg.seed, keys))
        repeated = [ex for ex in examples for _ in range(cfg.k)]
        verdicts = task.check_batch([tok.decode(t, skip_special_tokens=True) for t in gen.tokens], repeated)
        return [solution_row(tok, ex.id, t, v, j=r % cfg.k) for r, (ex, t, v) in enumerate(zip(repeated, gen.tokens, verdicts))]

    return run_cached(out / f"samples-{h}.jsonl", [(ex.id, ex) for ex in train], work, d, "1 sample + verify",
                      cfg.sampling_batch_size, rows_per_item=cfg.k)


# --- 2. reflect ---------------------------------------------------------------------------------------

@torch.no_grad()
def reflect(cfg, d, reflector, tok, task, examples, samples, out, name, reflector_id) -> list[dict]:
    """The reflector corrects failed samples from their feedback (greedy); each correction is verified."""
    failed, per_problem = [], Counter()
    for s in samples:
        if is_failure(s) and per_problem[s["key"]] < cfg.reflections_per_problem:
            per_problem[s["key"]] += 1
            failed.append(s)
    h = settings_hash(reflector_id, cfg.reflections_per_problem, cfg.max_completion_length, [s["text"] for s in failed])

    def work(keys, fails):
        exs = [examples[f["key"]] for f in fails]
        prompts = [chat_ids(tok, reflector_messages(task, ex, f["text"], f["feedback"])) for ex, f in zip(exs, fails)]
        gen = sample(reflector, stop_token_ids(tok, reflector), prompts, cfg, temperature=0)
        verdicts = task.check_batch([tok.decode(t, skip_special_tokens=True) for t in gen.tokens], exs)
        return [solution_row(tok, k, t, v, id=f["key"], failed=f["text"], failed_feedback=f["feedback"])
                for k, f, t, v in zip(keys, fails, gen.tokens, verdicts)]

    items = [(sample_key(f), f) for f in failed]
    return run_cached(out / f"reflections-{name}-{h}.jsonl", items, work, d, f"2 reflect ({name})",
                      cfg.sampling_batch_size)


# --- 3. train the reflector ---------------------------------------------------------------------------

def model_folder(s: Setup, name: str, init: str | None, data: list, kind: str = "sft") -> Path:
    """<out>/models/<name>-<hash> for a model that train_model makes from `init` and `data`. The hash covers
    all that the result depends on (the data's token ids and every training flag that changes the
    weights), so other settings train a new model instead of reusing one."""
    cfg = s.cfg
    h = settings_hash(kind, init, cfg.lora_r, cfg.lora_alpha, cfg.epochs, cfg.learning_rate, cfg.batch_size,
                      cfg.seed, cfg.dpo_beta if kind == "dpo" else None, cfg.bf16, data)
    folder = s.out / MODELS / f"{name}-{h}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def train_reflector(s: Setup, samples: Stage, zero_shot: Stage) -> TrainedReflector:
    """Supervised fine-tuning of the reflector on (problem, failed solution, feedback) -> its passing
    correction, then reflect (step 2) again with it. Without passing corrections to learn from, no reflector
    is trained (its row in the table says so)."""
    t, cfg = time.time(), s.cfg
    examples = s.examples
    pairs = sft_data(s.tok, passing(zero_shot.rows),
                     lambda r: reflector_messages(s.task, examples[r["id"]], r["failed"], r["failed_feedback"]))
    if not pairs:
        return TrainedReflector(None, Stage([], zero_shot.seconds + time.time() - t))
    folder = model_folder(s, "reflector", s.reflector_id, pairs)
    with par.off_device(s.agent, s.reflector):     # one model at a time on the device
        train_model(cfg, s.d, s.reflector_id, pairs, folder)
    model, _ = load_model(str(folder), device=s.d.device)
    rows = reflect(cfg, s.d, model, s.tok, s.task, examples, samples.rows, s.out, TRAINED, str(folder))
    return TrainedReflector(model, Stage(rows, zero_shot.seconds + time.time() - t))


# --- 4. train the agents ------------------------------------------------------------------------------

def dpo_pairs(samples, d_m, d_r) -> tuple[list[tuple[dict, dict]], dict]:
    """Re-ReST's DPO pairs as (chosen, rejected) rows, in sample order. Each failed sample is rejected
    against its own correction: the passing reflector output for that very sample, from D_R. Only a failed
    sample without one (not corrected, or its correction failed) is paired with a passing sample of the same
    problem from D_M, the problem's passing samples taken in turn so the fallbacks spread over them; with
    neither it is left out. Counts: pairs, own_correction, fallback, unpaired (failed samples left out)."""
    own = {r["key"]: r for r in d_r}            # a reflection's key is its failed sample's sample_key
    pool_of, pairs, counts, turn = {}, [], dict(own_correction=0, fallback=0, unpaired=0), Counter()
    for s in d_m:
        pool_of.setdefault(s["key"], []).append(s)
    for s in filter(is_failure, samples):
        pool = pool_of.get(s["key"])
        kind = "own_correction" if sample_key(s) in own else "fallback" if pool else "unpaired"
        counts[kind] += 1
        if kind != "unpaired":
            pairs.append((own[sample_key(s)] if kind == "own_correction" else pool[turn[s["key"]] % len(pool)], s))
        turn[s["key"]] += kind == "fallback"
    return pairs, dict(pairs=len(pairs), **counts)


def train_agent(s: Setup, name: str, data: list, sizes: tuple[int, int], data_seconds: float, idle: list,
                kind: str = "sft") -> Agent:
    """One row's agent, trained from the base model on `data` into <out>/models/<row>-<hash>. The hash
    covers the data's token ids: other data trains (and evaluates) a new model instead of reusing one."""
    t, cfg = time.time(), s.cfg
    if not data:
        return Agent(name, None, data_seconds, sizes)
    folder = model_folder(s, name.replace(" ", "_").replace("+", "and"), cfg.model, data, kind)
    with par.off_device(*idle):                    # one model at a time on the device
        train_model(cfg, s.d, cfg.model, data, folder, kind)
    return Agent(name, folder, data_seconds + time.time() - t, sizes)


def train_agents(s: Setup, samples: Stage, zero_shot: Stage,
                 trained: TrainedReflector | None) -> tuple[list[Agent], dict | None]:
    """The agents of the table's rows, in its order, and with --dpo dpo_pairs' counts. DPO's chosen
    corrections are the trained reflector's with --train-reflector (the paper's D_R), else the zero-shot one's."""
    examples = s.examples

    def prompt_of(row):
        return examples[row["id"] if "id" in row else row["key"]].messages

    d_m, d_r = passing(samples.rows), passing(zero_shot.rows)
    idle = [s.agent, s.reflector] + ([trained.model] if trained and trained.model else [])
    agents = [train_agent(s, SELF_TRAINING, sft_data(s.tok, d_m, prompt_of), (len(d_m), 0), samples.seconds, idle),
              train_agent(s, RE_REST, sft_data(s.tok, d_m + d_r, prompt_of), (len(d_m), len(d_r)),
                          samples.seconds + zero_shot.seconds, idle)]
    corrections = zero_shot
    if trained and trained.model is None:
        agents.append(Agent(WITH_TRAINED_REFLECTOR, None, trained.corrections.seconds, (len(d_m), 0), NO_REFLECTOR_DATA))
    elif trained:
        corrections = trained.corrections
        d_r2 = passing(corrections.rows)
        agents.append(train_agent(s, WITH_TRAINED_REFLECTOR, sft_data(s.tok, d_m + d_r2, prompt_of),
                                  (len(d_m), len(d_r2)), samples.seconds + corrections.seconds, idle))
    if not s.cfg.dpo:
        return agents, None
    pairs, counts = dpo_pairs(samples.rows, d_m, passing(corrections.rows))
    triples = []
    for good, bad in pairs:
        (prompt, chosen), (_, rejected) = sft_data(s.tok, [good, bad], prompt_of)
        triples.append((prompt, chosen, rejected))
    agents.append(train_agent(s, DPO, triples, (len(d_m), len(passing(corrections.rows))),
                              samples.seconds + corrections.seconds, idle, kind="dpo"))
    return agents, counts


# --- 5. evaluate --------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(cfg, d, model, tok, task, test, out, name, model_id) -> dict[str, bool]:
    """Greedy pass@1 on the test problems: each problem's solution row (per_item reads them), so that rows
    can be compared item by item (report)."""
    h = settings_hash(model_id, cfg.task, cfg.data_dir, cfg.eval_size, cfg.max_completion_length)

    def work(keys, examples):
        gen = sample(model, stop_token_ids(tok, model), [chat_ids(tok, ex.messages) for ex in examples], cfg, temperature=0)
        verdicts = task.check_batch([tok.decode(t, skip_special_tokens=True) for t in gen.tokens], examples)
        return [solution_row(tok, k, t, v) for k, t, v in zip(keys, gen.tokens, verdicts)]

    return run_cached(out / f"eval-{name}-{h}.jsonl", [(ex.id, ex) for ex in test], work, d, f"5 eval {name}",
                      cfg.sampling_batch_size)


def per_item(rows, field: str = "ok") -> dict[str, bool] | None:
    """{test problem key: passed} from rows that say `field` ("base": MBPP's own tests alone; None when none
    does). A key written twice (two runs appending to one cache) keeps its first judged row."""
    items = {}
    for r in rows:
        if r.get("judged", True) and field in r:
            items.setdefault(r["key"], bool(r[field]))
    return items if items or field == "ok" else None


@torch.no_grad()
def self_consistency(cfg, d, model, reflector, reflector_id, tok, task, test, out, name, model_id) -> dict[str, bool]:
    """mbpp: N samples per problem, each revised once by the reflector (greedy); the revised programs are
    grouped by their outputs on the test inputs and the largest group's first program (tie: the group met
    first) is scored on the asserts: {test problem key: passed}. The reflector sees the problem prompt,
    which on MBPP holds the asserts with their expected values, the sample (called a failed attempt, as
    every reflector input is, whether it passed or not) and its outputs on the test inputs, with no pass/fail
    marks: it can compare them with the expected values itself. The vote sees only the revised programs'
    outputs on those inputs, not the expected values. Not a blind test-time method on MBPP."""
    from verifiers import code_outputs_batch
    N = cfg.self_consistency
    h = settings_hash(model_id, cfg.task, cfg.data_dir, cfg.eval_size, cfg.max_completion_length, N, cfg.temperature,
                      cfg.seed, reflector_id)

    def outputs(texts, exs):
        return code_outputs_batch([(t, ex.reference["tests"], ex.reference.get("setup", "")) for t, ex in zip(texts, exs)])

    def work(keys, examples):
        gen = sample(model, stop_token_ids(tok, model), [chat_ids(tok, ex.messages) for ex in examples], cfg,
                     temperature=cfg.temperature, num_samples=N, generator=seeded(d, cfg.seed, keys))
        exs = [ex for ex in examples for _ in range(N)]
        texts = [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]
        seen = outputs(texts, exs)
        notes = ["Outputs of the program on the test inputs: " + "; ".join(o) for o in seen]
        prompts = [chat_ids(tok, reflector_messages(task, ex, t, n)) for ex, t, n in zip(exs, texts, notes)]
        revised_tokens = sample(reflector, stop_token_ids(tok, reflector), prompts, cfg, temperature=0).tokens
        revised = [tok.decode(t, skip_special_tokens=True) for t in revised_tokens]
        votes = outputs(revised, exs)
        chosen = []
        for i in range(len(examples)):
            group = [tuple(v) for v in votes[i * N:(i + 1) * N]]
            winner = Counter(group).most_common(1)[0][0]
            chosen.append(revised[i * N + group.index(winner)])
        verdicts = task.check_batch(chosen, examples)        # in parallel, as every other stage checks
        return [dict(key=key, ok=v.ok, text=text, **({"judged": False} if v.infra else {})) for key, text, v in zip(keys, chosen, verdicts)]

    rows = run_cached(out / f"sc-{name}-{h}.jsonl", [(ex.id, ex) for ex in test], work, d, f"5 self-consistency {name}",
                      cfg.sampling_batch_size)
    return per_item(rows)


def evaluate_model(s: Setup, model, name: str, model_id: str, seconds: float) -> dict:
    """A row of the table as report reads it: items (pass@1 per test problem), sc_items with
    --self-consistency (revised by the zero-shot reflector), time (`seconds` plus the evaluation's)."""
    t, cfg = time.time(), s.cfg
    answers = evaluate(cfg, s.d, model, s.tok, s.task, s.test, s.out, name, model_id)
    row = dict(items=(items := per_item(answers)), base_items=per_item(answers, "base"), not_judged=len(s.test) - len(items))
    if cfg.self_consistency:
        row["sc_items"] = self_consistency(cfg, s.d, model, s.reflector, s.reflector_id, s.tok, s.task, s.test, s.out, name, model_id)
    row["time"] = seconds + time.time() - t
    return row


def evaluate_rows(s: Setup, agents: list[Agent]) -> dict[str, dict]:
    """The base model's row, then each agent's (one trained model on the device at a time)."""
    rows = {BASE: evaluate_model(s, s.agent, BASE, s.cfg.model, 0.0)}
    for a in agents:
        if a.folder is None:
            rows[a.name] = dict(items=None, time=a.seconds, note=a.note)
            continue
        model, _ = load_model(str(a.folder), device=s.d.device)
        rows[a.name] = dict(folder=str(a.folder), **evaluate_model(s, model, a.name, str(a.folder), a.seconds))
        del model
    return rows


def link_final(s: Setup, agents: list[Agent]):
    """<out>/final: the Re-ReST agent's folder, as a relative link, which moves with <out>."""
    re_rest = next((a for a in agents if a.name == RE_REST and a.folder), None)
    if s.d.main and re_rest:
        link = s.out / (FINAL + ".tmp")
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(re_rest.folder, s.out), target_is_directory=True)
        link.replace(s.out / FINAL)


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
    return Setup(cfg, d, out, task, train, test, split_size, {ex.id: ex for ex in train}, tok, agent, reflector,
                 cfg.reflector_model or cfg.model)


def run(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    check_flags(cfg)
    if cfg.task == "mbpp" and os.environ.get("RANK", "0") == "0":
        print(sandbox.isolation()[1], flush=True)      # whether programs run isolated, or with limits only
    out = Path(cfg.out or DEFAULT_OUT.format(task=cfg.task))
    cfg.data_dir = data_dir_used(cfg.data_dir)     # the folder used ($RRR_DATA_DIR too): recorded and hashed
    announce(out, cfg, ("task", "model", "reflector_model", "k", "train_size", "eval_size", "epochs", "learning_rate",
                        "train_reflector", "self_consistency"))
    d, tracker = par.init_distributed(cfg.device), Tracker()
    try:
        resolve_machine_flags(cfg, d)
        s = setup(cfg, d, out)
        tracker = open_tracker(cfg.report_to, out, recorded_config(cfg, out), d.main, project="rerest")
        samples = timed(sample_solutions, cfg, d, s.agent, s.tok, s.task, s.train, out)                  # 1
        zero_shot = timed(reflect, cfg, d, s.reflector, s.tok, s.task, s.examples, samples.rows, out, ZERO_SHOT,
                          s.reflector_id)                                                                # 2
        trained = train_reflector(s, samples, zero_shot) if cfg.train_reflector else None                # 3
        agents, dpo = train_agents(s, samples, zero_shot, trained)                                       # 4
        rows = evaluate_rows(s, agents)                                                                  # 5
        table = write_report(cfg, out, rows, {a.name: a.sizes for a in agents}, s.split_size, dpo, d.main)
        tracker.log({f"pass1/{name}": sum(r["items"].values()) / len(r["items"]) for name, r in rows.items() if r["items"]}, 0)
        link_final(s, agents)
        if d.main:
            print(f"\n{table}\n\nreport: {out / 'report.md'}")
    finally:
        tracker.close()
        par.close_distributed()


if __name__ == "__main__":
    main_guard(run)
