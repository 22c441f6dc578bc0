"""Re-ReST (Dou et al. 2024): reflection-reinforced self-training, as one run that prints the ablation table.

    python rerest.py --task mbpp                                   # embedded SmolLM2-135M, 2-core CPU, ~8 min
    python rerest.py --task mbpp --train-reflector --dpo           # every row of the table
    torchrun --nproc_per_node=8 rerest.py --task mbpp --model codellama/CodeLlama-13b-Instruct-hf ...

The algorithm, one function per step (the README lists the same steps):
  1. sample_solutions   the agent draws --k solutions per training problem, and
  2.                    the task's verifier runs each: passing ones form D_M; failing ones keep the
                        verifier's feedback (which asserts passed, which failed, with the actual output)
  3. reflect            the reflector gets (problem, failed solution, feedback) and writes a corrected
                        solution; the corrections that pass form D_R
  4. train_model        --train-reflector: fine-tune the reflector on (problem, failure, feedback) ->
                        passing correction, then reflect again with it
  5. train_model        the agent, from the base model: on D_M (self-training), on D_M + D_R (Re-ReST),
                        and with --dpo on pairs (dpo_pairs): each failed sample is rejected against its own
                        correction from D_R (the trained reflector's with --train-reflector), or, only when
                        it has none, against a passing sample of the same problem from D_M; the loss covers
                        solution tokens only; full fine-tuning, or LoRA (--lora-r) merged on export
  6. evaluate           greedy pass@1 per test problem; report gives each row its 95% Wilson interval and
                        its paired change from "base" (exact McNemar). --self-consistency N adds a vote that
                        is not blind on MBPP: the prompts hold the asserts' expected values (self_consistency)

Every stage writes its results under --out in a file whose name carries a hash of the settings it depends
on, so a run with other flags for a later stage reuses the earlier stages, and an interrupted run picks up
where it stopped. Nothing is overwritten.

Simplifications: one reflection round; at most --reflections-per-problem failed samples of a problem are
corrected; the reflector is prompted zero-shot unless --train-reflector; D_M keeps every passing sample,
duplicates included.
"""

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import parallel as par
import sandbox
from data import get_task, reflector_messages, resolve_data_dir
from grpo import pad_batch, token_logprobs
from model import chat_ids, load_model, stop_token_ids
from runs import (BadInput, append_jsonl, change_text, flag, main_guard, markdown_table, paired_change, parse_config,
                  read_jsonl, wilson_interval, with_interval, write_json)
from sampler import fuse_projections, generate


@dataclass
class Config:
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
    bf16: bool | None = flag(None, "compute in bf16 with fp32 master weights when training (TRL's name); default: "
                             "on with CUDA, off on CPU (--no-bf16 turns it off)")
    gradient_checkpointing: bool | None = flag(None, "recompute each decoder layer's activations in backward "
                                               "instead of keeping them; default: on above 1B parameters")
    cuda_graphs: bool = flag(True, "on CUDA, capture each decode-step shape as a CUDA graph and replay it "
                             "(--no-cuda-graphs decodes eagerly, with the same kernels)")
    self_consistency: int = flag(0, "mbpp: also sample N solutions per test problem, let the reflector revise each "
                                 "from the problem prompt (which holds the asserts with their expected values) and "
                                 "the program's outputs on the test inputs, and majority-vote by the revised programs' "
                                 "outputs on those inputs (0: off)")
    require_isolation: bool = flag(False, "mbpp: refuse to start when the code sandbox cannot isolate programs "
                                   "(bubblewrap missing or no namespaces) instead of running them with process limits only")
    seed: int = flag(0, "seed for sampling, data order and LoRA init")
    device: str | None = flag(None, "cpu or cuda (default: cuda when available)", choices=["cpu", "cuda"])


def settings_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def sample(model, tok, prompts, cfg, *, temperature, num_samples=1, seed=0):
    # The sampler multiplies by q/k/v and gate/up as one matrix each: laid back to back here, they are
    # views, not per-call copies. Done on every call, as off_device's moves undo it; a no-op otherwise.
    fuse_projections(model)
    gen = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    return generate(model, prompts, max_new_tokens=cfg.max_completion_length, num_samples=num_samples,
                    temperature=temperature, stop_token_ids=stop_token_ids(tok, model), generator=gen,
                    cuda_graphs=cfg.cuda_graphs)


def run_cached(path: Path, items: list[tuple[str, object]], work, d, desc: str, per_rank: int) -> list[dict]:
    """A resumable stage. items are (key, payload); work(keys, payloads) returns result rows, each
    carrying its item's "key". Items whose key is in `path` already are not redone; new rows are
    appended chunk by chunk, a chunk being `per_rank` items per rank (rank 0 reads and writes, every
    rank works on its share). Returns the rows of all items in item order."""
    done = {}
    for row in par.broadcast_object(read_jsonl(path) if d.main else None, d):
        done.setdefault(row["key"], []).append(row)
    todo = [(k, p) for k, p in items if k not in done]
    for _, mine in tqdm(list(par.rank_chunks(todo, per_rank, d)), desc=desc, disable=not d.main or not todo):
        rows = work([k for k, _ in mine], [p for _, p in mine]) if mine else []
        new = [r for part in par.all_gather_objects(rows, d) for r in part]
        for r in new:
            done.setdefault(r["key"], []).append(r)
        if d.main:
            append_jsonl(path, new)
    return [r for k, _ in items for r in done.get(k, [])]


def failed_key(sample: dict) -> str:
    """The key of a sampled solution, "<problem id>/<sample index>": a reflection row carries its failed
    sample's, which is how DPO finds a failed sample's own correction."""
    return f"{sample['key']}/{sample['j']}"


def solution_row(tok, key, tokens, verdict, **extra):
    return dict(key=key, tokens=tokens, text=tok.decode(tokens, skip_special_tokens=True), ok=verdict.ok,
                feedback=verdict.feedback, **extra)


# --- 1-2. sample and verify --------------------------------------------------------------------------

@torch.no_grad()
def sample_solutions(cfg, d, agent, tok, task, train, out) -> list[dict]:
    """k solutions per training problem, each with the verifier's verdict and feedback."""
    h = settings_hash(cfg.task, cfg.model, cfg.data_dir, cfg.train_size, cfg.seed, cfg.k, cfg.temperature,
                      cfg.max_completion_length)

    def work(keys, examples):
        gen = sample(agent, tok, [chat_ids(tok, ex.messages) for ex in examples], cfg, temperature=cfg.temperature,
                     num_samples=cfg.k, seed=int(settings_hash(cfg.seed, keys), 16))
        repeated = [ex for ex in examples for _ in range(cfg.k)]
        verdicts = task.check_batch([tok.decode(t, skip_special_tokens=True) for t in gen.tokens], repeated)
        return [solution_row(tok, ex.id, t, v, j=r % cfg.k) for r, (ex, t, v) in enumerate(zip(repeated, gen.tokens, verdicts))]

    return run_cached(out / f"samples-{h}.jsonl", [(ex.id, ex) for ex in train], work, d, "1-2 sample + verify",
                      cfg.sampling_batch_size)


# --- 3. reflect ---------------------------------------------------------------------------------------

@torch.no_grad()
def reflect(cfg, d, reflector, tok, task, examples, samples, out, name, reflector_id) -> list[dict]:
    """The reflector corrects failed samples from their feedback (greedy); each correction is verified."""
    failed, per_problem = [], Counter()
    for s in samples:
        if not s["ok"] and per_problem[s["key"]] < cfg.reflections_per_problem:
            per_problem[s["key"]] += 1
            failed.append(s)
    h = settings_hash(reflector_id, cfg.reflections_per_problem, cfg.max_completion_length, [s["text"] for s in failed])

    def work(keys, fails):
        exs = [examples[f["key"]] for f in fails]
        prompts = [chat_ids(tok, reflector_messages(task, ex, f["text"], f["feedback"])) for ex, f in zip(exs, fails)]
        gen = sample(reflector, tok, prompts, cfg, temperature=0)
        verdicts = task.check_batch([tok.decode(t, skip_special_tokens=True) for t in gen.tokens], exs)
        return [solution_row(tok, k, t, v, id=f["key"], failed=f["text"], failed_feedback=f["feedback"])
                for k, f, t, v in zip(keys, fails, gen.tokens, verdicts)]

    items = [(failed_key(f), f) for f in failed]
    return run_cached(out / f"reflections-{name}-{h}.jsonl", items, work, d, f"3 reflect ({name})",
                      cfg.sampling_batch_size)


# --- 4-5. training: SFT (full or LoRA) and DPO --------------------------------------------------------

class LoRALinear(torch.nn.Module):
    """base(x) + (alpha / r) * x A^T B^T. B starts at zero, so the model is unchanged at init."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base, self.scale = base, alpha / r
        a = torch.randn(r, base.in_features, generator=generator) / base.in_features ** 0.5
        self.lora_a = torch.nn.Parameter(a.to(base.weight))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, r).to(base.weight))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(model, r: int, alpha: float, seed: int, targets=("q_proj", "v_proj")):
    """Freezes the model and puts LoRA adapters on the targets of every attention block."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for layer in par.decoder_layers(model):
        for name in targets:
            setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), r, alpha, g))
    return model


def merged_state(model) -> dict:
    """The full weights with every LoRA update merged, in plain Hugging Face names, on rank 0 (gathered
    one parameter at a time to its CPU; empty on the other ranks). A collective."""
    full = par.full_state_on_rank0(model)
    out = {}
    for name, t in full.items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        if ".base." in name:
            prefix = name.split(".base.")[0]
            if name.endswith(".weight"):
                module = model.get_submodule(prefix)
                t = t + module.scale * (full[prefix + ".lora_b"] @ full[prefix + ".lora_a"])
            name = name.replace(".base.", ".")
        out[name] = t
    return out


def sft_loss(logprobs, mask, total_tokens):
    """Mean negative log-likelihood of the solution tokens (mask 1) over the whole step's solution tokens."""
    return -(logprobs * mask).sum() / total_tokens


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """Per pair: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), from sequence log-prob sums (P,)."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def train_model(cfg, d, init: str | None, data: list, folder: Path, kind: str = "sft") -> Path:
    """Fine-tunes `init` and exports it to `folder` (Hugging Face format, LoRA merged). data: for "sft",
    (prompt_ids, target_ids) pairs; for "dpo", (prompt_ids, chosen_ids, rejected_ids) triples."""
    if (folder / "config.json").exists():
        return folder
    # Loaded on the CPU: sharding moves one layer at a time to the device.
    model, tok = load_model(init, device="cpu", dtype=torch.float32)
    if cfg.lora_r:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.seed)
    model.train()
    par.shard_model(model, d, bf16=cfg.bf16, checkpointing=cfg.gradient_checkpointing)
    ref = None
    if kind == "dpo":    # the base model, frozen, sharded like the trained one, in the compute dtype
        ref, _ = load_model(init, device="cpu", dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
        par.shard_model(ref.requires_grad_(False), d, bf16=cfg.bf16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    per_rank = cfg.batch_size // d.world
    steps_per_epoch = max(1, -(-len(data) // cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    state = par.load_checkpoint(folder / "checkpoints", model, optimizer, d) or dict(step=0)
    for step in tqdm(range(state["step"], total), desc=f"train {folder.name}", disable=not d.main):
        epoch, i = divmod(step, steps_per_epoch)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch)).tolist()
        # Every rank takes the same number of rows (wrapping around), so FSDP's collectives line up.
        picked = [data[order[(i * cfg.batch_size + j) % len(data)]] for j in range(cfg.batch_size)]
        mine = picked[d.rank * per_rank:(d.rank + 1) * per_rank]
        if kind == "sft":
            total_tokens = sum(len(t) for _, t in picked)
            for start in range(0, len(mine), cfg.micro_batch_size):
                part = mine[start:start + cfg.micro_batch_size]
                ids, attn, mask = pad_batch([p + t for p, t in part], [(len(p), len(p) + len(t)) for p, t in part], d.device)
                loss = sft_loss(token_logprobs(model, ids, attn, mask), mask, total_tokens)
                (loss * d.world).backward()        # FSDP averages over ranks
        else:
            for start in range(0, len(mine), cfg.micro_batch_size):
                part = mine[start:start + cfg.micro_batch_size]
                seqs = [p + c for p, c, _ in part] + [p + r for p, _, r in part]
                spans = [(len(p), len(p) + len(c)) for p, c, _ in part] + [(len(p), len(p) + len(r)) for p, _, r in part]
                ids, attn, mask = pad_batch(seqs, spans, d.device)
                sums = token_logprobs(model, ids, attn, mask).sum(1)
                with torch.no_grad():
                    ref_sums = token_logprobs(ref, ids, attn, mask).sum(1)
                ref.reshard()      # its root stays gathered after a forward that has no backward
                n = len(part)
                loss = dpo_loss(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:], cfg.dpo_beta).sum() / cfg.batch_size
                (loss * d.world).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % steps_per_epoch == 0 and step + 1 < total:
            par.save_checkpoint(folder / "checkpoints", step + 1, model, optimizer, {}, d)
    par.export_hf(model, tok, folder, d, state=merged_state(model))
    return folder


def sft_data(tok, rows, prompt_of) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, solution ids ending with EOS) for each passing row; prompt_of(row) gives the messages."""
    data = []
    for r in rows:
        target = list(r["tokens"])
        if target and target[-1] == tok.eos_token_id:
            target = target[:-1]
        data.append((chat_ids(tok, prompt_of(r)), target + [tok.eos_token_id]))
    return data


def dpo_pairs(samples, d_m, d_r) -> tuple[list[tuple[dict, dict]], dict]:
    """Re-ReST's DPO pairs as (chosen, rejected) rows, in sample order. Each failed sample is rejected
    against its own correction: the passing reflector output for that very sample, from D_R. Only a failed
    sample without one (not corrected, or its correction failed) is paired with a passing sample of the same
    problem from D_M, the problem's passing samples taken in turn so the fallbacks spread over them; with
    neither it is left out. Counts: pairs, own_correction, fallback, unpaired (failed samples left out)."""
    own = {r["key"]: r for r in d_r}            # a reflection's key is its failed sample's failed_key
    passing, pairs, counts, turn = {}, [], dict(own_correction=0, fallback=0, unpaired=0), Counter()
    for s in d_m:
        passing.setdefault(s["key"], []).append(s)
    for s in (s for s in samples if not s["ok"]):
        pool = passing.get(s["key"])
        kind = "own_correction" if failed_key(s) in own else "fallback" if pool else "unpaired"
        counts[kind] += 1
        if kind != "unpaired":
            pairs.append((own[failed_key(s)] if kind == "own_correction" else pool[turn[s["key"]] % len(pool)], s))
        turn[s["key"]] += kind == "fallback"
    return pairs, dict(pairs=len(pairs), **counts)


# --- 6. evaluate --------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(cfg, d, model, tok, task, test, out, name, model_id) -> dict[str, bool]:
    """Greedy pass@1 on the test problems: {test problem key: passed}, per problem, so that rows can be
    compared item by item (report)."""
    h = settings_hash(model_id, cfg.task, cfg.data_dir, cfg.eval_size, cfg.max_completion_length)

    def work(keys, examples):
        gen = sample(model, tok, [chat_ids(tok, ex.messages) for ex in examples], cfg, temperature=0)
        verdicts = task.check_batch([tok.decode(t, skip_special_tokens=True) for t in gen.tokens], examples)
        return [solution_row(tok, k, t, v) for k, t, v in zip(keys, gen.tokens, verdicts)]

    rows = run_cached(out / f"eval-{name}-{h}.jsonl", [(ex.id, ex) for ex in test], work, d, f"6 eval {name}",
                      cfg.sampling_batch_size)
    return per_item(rows)


def per_item(rows) -> dict[str, bool]:
    # A key written twice (two runs appending to one cache) keeps its first row, the one a run would score.
    items = {}
    for r in rows:
        items.setdefault(r["key"], bool(r["ok"]))
    return items


@torch.no_grad()
def self_consistency(cfg, d, model, reflector, tok, task, test, out, name, model_id) -> dict[str, bool]:
    """mbpp: N samples per problem, each revised once by the reflector (greedy); the revised programs are
    grouped by their outputs on the test inputs and the largest group's first program (tie: the group met
    first) is scored on the asserts: {test problem key: passed}. The reflector sees the problem prompt,
    which on MBPP holds the asserts with their expected values, the sample (called a failed attempt, as
    every reflector input is, whether it passed or not) and its outputs on the test inputs, with no pass/fail
    marks: it can compare them with the expected values itself. The vote sees only the revised programs'
    outputs on those inputs, not the expected values. Not a blind test-time method on MBPP."""
    from verifiers import code_outputs_batch
    N = cfg.self_consistency
    h = settings_hash(model_id, cfg.task, cfg.data_dir, cfg.eval_size, cfg.max_completion_length, N, cfg.temperature)

    def outputs(texts, exs):
        return code_outputs_batch([(t, ex.reference["tests"], ex.reference.get("setup", "")) for t, ex in zip(texts, exs)])

    def work(keys, examples):
        gen = sample(model, tok, [chat_ids(tok, ex.messages) for ex in examples], cfg, temperature=cfg.temperature,
                     num_samples=N, seed=int(settings_hash(cfg.seed, keys), 16))
        exs = [ex for ex in examples for _ in range(N)]
        texts = [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]
        seen = outputs(texts, exs)
        notes = ["Outputs of the program on the test inputs: " + "; ".join(o) for o in seen]
        prompts = [chat_ids(tok, reflector_messages(task, ex, t, n)) for ex, t, n in zip(exs, texts, notes)]
        revised = [tok.decode(t, skip_special_tokens=True) for t in sample(reflector, tok, prompts, cfg, temperature=0).tokens]
        votes = outputs(revised, exs)
        rows = []
        for i, (key, ex) in enumerate(zip(keys, examples)):
            group = [tuple(v) for v in votes[i * N:(i + 1) * N]]
            winner = Counter(group).most_common(1)[0][0]
            chosen = revised[i * N + group.index(winner)]
            rows.append(dict(key=key, ok=task.check(chosen, ex).ok, text=chosen))
        return rows

    rows = run_cached(out / f"sc-{name}-{h}.jsonl", [(ex.id, ex) for ex in test], work, d, f"6 self-consistency {name}",
                      cfg.sampling_batch_size)
    return per_item(rows)


def run(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    for name in ("k", "train_size", "eval_size", "max_completion_length", "epochs", "batch_size",
                 "micro_batch_size", "reflections_per_problem", "sampling_batch_size"):
        if getattr(cfg, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.self_consistency and cfg.task != "mbpp":
        raise BadInput("--self-consistency votes by program outputs: it needs --task mbpp")
    if cfg.task == "mbpp":
        isolated, line = sandbox.isolation()
        if not isolated and cfg.require_isolation:
            raise BadInput(line + " (--require-isolation)")
        if os.environ.get("RANK", "0") == "0":
            print(line, flush=True)
    out = Path(cfg.out or f"runs/rerest-{cfg.task}")
    d = par.init_distributed(cfg.device)
    try:
        if cfg.bf16 is None:
            cfg.bf16 = d.device.type == "cuda"
        if cfg.batch_size % d.world:
            raise BadInput(f"--batch-size {cfg.batch_size} must be a multiple of the {d.world} ranks")
        table = run_stages(cfg, d, out)
        if d.main:
            print(f"\n{table}\n\nreport: {out / 'report.md'}")
    finally:
        par.close_distributed()


def run_stages(cfg, d, out: Path) -> str:
    task = get_task(cfg.task)
    data_dir = resolve_data_dir(cfg.data_dir)
    train = task.load("train", data_dir=data_dir, size=cfg.train_size, seed=cfg.seed)
    test = task.load("test", data_dir=data_dir, size=cfg.eval_size, seed=cfg.seed)
    # The whole split's size, for the report's "40 of 500" (a second load: Countdown's offline loader
    # generates `size` puzzles, so slicing one full load would not give the same test set everywhere).
    split_size = len(task.load("test", data_dir=data_dir, size=None, seed=cfg.seed)) if d.main else None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        append_jsonl(out / "invocations.jsonl", [dict(asdict(cfg), time=time.time())])
    par.check_shared_folder(out, d)
    examples = {ex.id: ex for ex in train}
    agent, tok = load_model(cfg.model, device=d.device)
    reflector = agent if cfg.reflector_model is None else load_model(cfg.reflector_model, device=d.device)[0]
    reflector_id = cfg.reflector_model or cfg.model
    idle = [agent, reflector]              # models kept for sampling, moved off the device while one trains
    timings, rows = {}, {}

    t = time.time()
    rows["base"] = dict(items=evaluate(cfg, d, agent, tok, task, test, out, "base", cfg.model))
    rows["base"]["time"] = time.time() - t
    t = time.time()
    samples = sample_solutions(cfg, d, agent, tok, task, train, out)                              # 1-2
    d_m = [s for s in samples if s["ok"]]
    timings["sample"] = time.time() - t
    t = time.time()
    reflections = reflect(cfg, d, reflector, tok, task, examples, samples, out, "zero-shot", reflector_id)  # 3
    d_r = [r for r in reflections if r["ok"]]
    timings["reflect"] = time.time() - t

    def agent_prompt(row):
        return examples[row["id"] if "id" in row else row["key"]].messages

    def agent_row(name, data, kind="sft", extra_time=0.0):
        t0 = time.time()
        if not data:
            rows[name] = dict(items=None, time=extra_time, note="no training data")
            return
        h = settings_hash(kind, cfg.model, cfg.lora_r, cfg.lora_alpha, cfg.epochs, cfg.learning_rate, cfg.batch_size,
                          cfg.seed, cfg.dpo_beta if kind == "dpo" else None, data)
        folder = out / "models" / f"{name.replace(' ', '_').replace('+', 'and')}-{h}"
        folder.mkdir(parents=True, exist_ok=True)
        with par.off_device(*idle):     # one model at a time on the device
            train_model(cfg, d, cfg.model, data, folder, kind)                                      # 4-5
        model, _ = load_model(str(folder), device=d.device)
        rows[name] = dict(items=evaluate(cfg, d, model, tok, task, test, out, name, str(folder)), folder=str(folder))
        if cfg.self_consistency:
            rows[name]["sc_items"] = self_consistency(cfg, d, model, reflector, tok, task, test, out, name, str(folder))
        rows[name]["time"] = time.time() - t0 + extra_time

    if cfg.self_consistency:
        rows["base"]["sc_items"] = self_consistency(cfg, d, agent, reflector, tok, task, test, out, "base", cfg.model)
    agent_row("self-training", sft_data(tok, d_m, agent_prompt), extra_time=timings["sample"])
    agent_row("Re-ReST", sft_data(tok, d_m + d_r, agent_prompt), extra_time=timings["sample"] + timings["reflect"])
    sizes = {"self-training": (len(d_m), 0), "Re-ReST": (len(d_m), len(d_r))}
    if cfg.train_reflector:                                                                        # 4
        t = time.time()
        pairs = sft_data(tok, d_r, lambda r: reflector_messages(task, examples[r["id"]], r["failed"], r["failed_feedback"]))
        trained_reflector, d_r2 = reflector, d_r
        if pairs:
            folder = out / "models" / f"reflector-{settings_hash(reflector_id, cfg.lora_r, cfg.epochs, cfg.learning_rate, cfg.seed, pairs)}"
            folder.mkdir(parents=True, exist_ok=True)
            with par.off_device(*idle):
                train_model(cfg, d, cfg.reflector_model or cfg.model, pairs, folder)
            trained_reflector, _ = load_model(str(folder), device=d.device)
            idle.append(trained_reflector)
            d_r2 = [r for r in reflect(cfg, d, trained_reflector, tok, task, examples, samples, out, "trained", str(folder)) if r["ok"]]
        timings["reflect"] += time.time() - t
        agent_row("Re-ReST + trained reflector", sft_data(tok, d_m + d_r2, agent_prompt),
                  extra_time=timings["sample"] + timings["reflect"])
        sizes["Re-ReST + trained reflector"] = (len(d_m), len(d_r2))
    dpo = None
    if cfg.dpo:
        # The corrections of the trained reflector with --train-reflector (the paper's D_R), else the zero-shot
        # one's. The triples' token ids enter the model folder's hash (agent_row) and so the hash of its
        # evaluations: another pairing trains and evaluates a new model instead of reusing the old one.
        corrections = d_r2 if cfg.train_reflector else d_r
        pairs, dpo = dpo_pairs(samples, d_m, corrections)
        triples = []
        for good, bad in pairs:
            (prompt, chosen), (_, rejected) = sft_data(tok, [good, bad], agent_prompt)
            triples.append((prompt, chosen, rejected))
        agent_row("DPO", triples, kind="dpo", extra_time=timings["sample"] + timings["reflect"])
        sizes["DPO"] = (len(d_m), len(corrections))
    if d.main and rows["Re-ReST"].get("folder"):       # the method's agent, as <out>/final
        link = out / "final.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(Path(rows["Re-ReST"]["folder"]).resolve(), target_is_directory=True)
        link.replace(out / "final")
    return write_report(cfg, out, rows, sizes, split_size, dpo)


TASK_NAMES = {"mbpp": "MBPP", "countdown": "Countdown", "function_calling": "function-calling"}


def score(items: dict | None, base: dict | None) -> dict | None:
    """From per-item results {test problem key: passed}: k, n, pass@1, 95% Wilson interval and, given the
    "base" row's results, the paired change with its exact McNemar test. None for a row without results."""
    if items is None:
        return None
    k, n = sum(items.values()), len(items)
    got = dict(k=k, n=n, pass1=k / n if n else None, interval=list(wilson_interval(k, n)))
    if base is not None:
        got["change"] = paired_change(base, items)
    return got


def report(cfg, rows: dict, sizes: dict, split_size: int | None, dpo: dict | None = None) -> tuple[str, str, dict]:
    """report.md's text, its table and report.json's content from each row's per-item results: rows[name] =
    dict(items={key: passed} or None, sc_items (--self-consistency), time, folder, note); every row is compared
    with rows["base"] on the same problems. split_size: the whole test split's; dpo: dpo_pairs' counts."""
    base = rows["base"]
    n = len(base["items"])
    where = f"{n} of {split_size if split_size is not None else '?'} {TASK_NAMES.get(cfg.task, cfg.task)} test problems"
    columns = [("pass1", "items", f"pass@1 [95% CI] on {where}")]
    if cfg.self_consistency:
        columns.append(("sc", "sc_items", f"pass@1 [95% CI], self-consistency {cfg.self_consistency}"))
    header = ["row"] + [h for _, _, head in columns for h in (head, "vs base")] + ["D_M size", "D_R size", "wall time"]
    body, changes, summary = [], [], {}
    for name, r in rows.items():
        line, summary[name] = [name], {k: v for k, v in r.items() if k not in ("items", "sc_items")}
        for col, key, head in columns:
            got = score(r.get(key), None if name == "base" else base.get(key))
            summary[name][col], summary[name][key] = got, r.get(key)
            change = (got or {}).get("change")
            line += [with_interval(got["k"], got["n"]) if got else "-",
                     "-" if not change else f"{100 * change['change']:+.1f} pts, p = {change['p_value']:.3g}"
                     + ("" if change["p_value"] < 0.05 else ", within noise")]
            if change:
                changes.append(f"- {name}{'' if col == 'pass1' else ' (self-consistency)'} vs base: {change_text(change)}")
        dm, dr = sizes.get(name, ("-", "-"))
        body.append(line + [dm, dr, f"{r['time'] / 60:.1f} min"])
    table = markdown_table(header, body)
    subset = ("the whole split" if split_size == n else "a subset (--eval-size), not the paper's full-split protocol")
    if cfg.data_dir is None and not os.environ.get("RRR_DATA_DIR"):
        subset += "; offline data, not the real split (pass --data-dir)"
    model = cfg.model or "SmolLM2-135M-Instruct (embedded)"
    text = (f"# Re-ReST on {cfg.task}: {model}\n\nTest set: {where}, {subset}. k = {cfg.k} samples per training "
            f"problem; {'LoRA r=%d' % cfg.lora_r if cfg.lora_r else 'full fine-tuning'}, {cfg.epochs} epochs.\n\n"
            f"{table}\n\nEach pass@1 carries its 95% Wilson interval. Each row's change from \"base\" is paired on the "
            f"same {n} problems and tested with the exact two-sided McNemar test; \"within noise\" means p >= 0.05: "
            f"on this many problems the difference cannot be told from chance.\n" + "".join(f"\n{c}" for c in changes) + "\n")
    if dpo is not None:
        text += (f"\nDPO pairs: {dpo['pairs']}, the failed sample rejected in each; chosen: its own passing correction "
                 f"from D_R in {dpo['own_correction']}, another passing sample of its problem from D_M (no correction "
                 f"passed) in {dpo['fallback']}. {dpo['unpaired']} failed samples had neither and are not used.\n")
    if cfg.self_consistency:
        text += ("\nSelf-consistency on MBPP is not a blind test-time method: the reflector's prompt holds the asserts "
                 "with their expected values, and the vote runs the programs on the same test inputs.\n")
    if any(r.get("note") for r in rows.values()):
        text += "\nRows without a score had no training data (no passing solutions).\n"
    return text, table, dict(config=asdict(cfg), test=dict(n=n, split_size=split_size, task=cfg.task),
                             rows=summary, sizes=sizes, dpo_pairs=dpo)


def write_report(cfg, out, rows, sizes, split_size, dpo=None) -> str:
    text, table, summary = report(cfg, rows, sizes, split_size, dpo)
    if par.dist.get_rank() == 0:
        (out / "report.md").write_text(text)
        write_json(out / "report.json", summary)
    return table


if __name__ == "__main__":
    main_guard(run)
