"""A labelled warm start: supervised fine-tuning on solver-written Countdown solutions, cached.

RRR "needs a model with some base ability to do the task, reflect and learn" (Bensal et al. 2025, its
limitations). The embedded SmolLM2-135M-Instruct has none on Countdown: it copies the prompt's example
`(1 + 2) / 3`, every group of reflections gets the same reward and every advantage is 0. This gives it
partial skill with labels, as a warm start that runs say what they are:

    python warmstart.py --task countdown_easy --puzzles 1000       # prints the cached model's folder
    python rrr.py --task countdown_easy --warm-start 1000          # RRR from that model

The labels: the first `--puzzles` train-split puzzles of the task's generator under a seed of their own
(WARM_SEED), answered by data/countdown.solve_countdown as "<answer> EQUATION </answer>" (no thinking
before it), leaving out every puzzle of the task's whole test split (with --data-dir, the real test file's).
One epoch of full fine-tuning (finetune.train_model: the loss covers the answer tokens only).

With --reflections the labels also cover RRR's second turn, which an answers-only warm start never sees (it
answers the reflection prompt with another `<answer>`): for each puzzle, a wrong first answer (the numbers
in a random order with random + - * between them, one that misses the target), the task's reflection prompt,
a labelled reflection built from the verifier's verdict on that answer ("My equation (7 + 3) * 2 equals 20,
not 14: 6 too high. ..."), the retry prompt and the solver's answer. The loss covers the reflection and the
retry answer (two training rows; the wrong answer is context only), so the warm start's reflections and
retries are labelled too, which every run that uses it records. The labelled reflections of 800 puzzles
are 58 tokens long at the median with their end token on countdown_easy (at most 65; 1.1% above rrr.py's
default --max-reflection-length of 64, cut before their end token), 67 on countdown (at most 79; 63% above
64): give countdown runs --max-reflection-length 96.

Cached in $RRR_CACHE/warm-start/<task>-<puzzles>-<hash of every setting>, with `warm_start.json`
describing it, which rrr.py records in config.json and its report. Building it is a collective (every rank
of a torchrun job calls it) and resumable: the trainer keeps a checkpoint per epoch and the export is
written to a temporary folder and renamed.
"""

import argparse
import hashlib
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

from data import data_dir_used, get_task, resolve_data_dir
from data.countdown import TIERS, check_warm_start, generate_puzzles, prompt, solve_countdown
from verifiers import check_countdown
from runs import (EMBEDDED_NAMES, LR_SCHEDULER_TYPES, BadInput, OneLineParser, bf16_by_default, cache_root,
                  check_lr_schedule, check_model_name, main_guard, write_json)

WARM_SEED = 1_000_001        # the labelled puzzles' own generator seed: not a run's --seed
LEARNING_RATE = 1e-4
DEFAULT_SCHEDULE = ("constant", 0.0)      # --lr-scheduler-type and --warmup-ratio of every warm start cached
BATCH_SIZE = 16
DESCRIPTION = ("supervised fine-tuning (1 epoch, full) on {puzzles} solver-written answers to generated "
               "{task} train-split puzzles, none of them in the test split")
REFLECTIONS = (" and, after a wrong first answer to each, a reflection built from the verifier's verdict and "
               "the solver's retry")


def parse_args(argv=None) -> argparse.Namespace:
    # OneLineParser: argparse's own errors (an unknown flag, say) are one line too, not the usage block.
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="countdown_easy", choices=tuple(TIERS),
                    help="the task whose puzzles are answered")
    ap.add_argument("--puzzles", type=int, default=1000, help="labelled puzzles to fine-tune on (one epoch)")
    ap.add_argument("--model", default=None,
                    help="base model: Hugging Face folder or hub id (default: the embedded one)")
    ap.add_argument("--data-dir", default=None, help="data folder, for the test split to keep out (default "
                    "$RRR_DATA_DIR, else the offline data)")
    ap.add_argument("--reflections", action="store_true",
                    help="the labels also cover the reflection turn and the retry (see above)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 compute (default: as rrr.py chooses for this machine)")
    ap.add_argument("--lr-scheduler-type", default=DEFAULT_SCHEDULE[0], choices=LR_SCHEDULER_TYPES,
                    help="learning-rate schedule over the optimizer steps, as transformers' (TRL's flag): "
                    "linear or cosine decay to 0 (default: constant, what rrr.py --warm-start uses)")
    ap.add_argument("--warmup-ratio", type=float, default=DEFAULT_SCHEDULE[1],
                    help="linear or cosine: the first ceil(this x the steps) steps rise linearly from 0 "
                    "(TRL's flag; in [0, 1); default: 0)")
    args = ap.parse_args(argv)
    if args.puzzles < 1:
        raise BadInput("--puzzles must be at least 1")
    check_lr_schedule(args)
    check_model_name(args.model)
    resolve_data_dir(args.data_dir)
    return args


if __name__ == "__main__":      # a bad flag fails here, in a fraction of a second, before torch loads (3-5 s)
    main_guard(parse_args)

# torch and the modules that load it come after the early check of the command line, on purpose.
import parallel as par
from model import chat_ids, load_tokenizer, next_turn_ids


def labelled_examples(task_name: str, puzzles: int, data_dir) -> tuple[list[tuple[list[int], int, str]], int]:
    """(nums, target, answer text) for `puzzles` generated train-split puzzles that are not in the task's
    test split, and how many generated puzzles were left out for being there."""
    test = {(tuple(sorted(ex.reference["nums"])), ex.reference["target"])
            for ex in get_task(task_name).load("test", data_dir=resolve_data_dir(data_dir))}
    extra = 0
    while True:       # draw more when some are left out, from the same stream (a longer prefix of it)
        drawn = generate_puzzles(puzzles + extra, "train", WARM_SEED, task_name)
        kept = [(n, t) for n, t in drawn if (tuple(sorted(n)), t) not in test]
        if len(kept) >= puzzles:
            break
        extra += puzzles - len(kept)
    kept = kept[:puzzles]
    return [(n, t, f"<answer> {solve_countdown(n, t)} </answer>") for n, t in kept], len(drawn) - len(kept)


def wrong_answer(nums, target, rng: random.Random) -> tuple[str, str]:
    """A well-formed answer that misses: the numbers in a random order, random + - * between them, the
    first two in parentheses; and the verifier's feedback on it ("equals 20, not 14")."""
    while True:
        order, ops = rng.sample(list(nums), len(nums)), [rng.choice("+-*") for _ in nums[1:]]
        later = "".join(f" {o} {n}" for o, n in zip(ops[1:], order[2:]))
        equation = f"({order[0]} {ops[0]} {order[1]}){later}"
        verdict = check_countdown(f"<answer> {equation} </answer>", nums, target)
        if not verdict.ok:
            return equation, verdict.feedback


def reflection_label(nums, target, equation: str, feedback: str) -> str:
    """The labelled reflection on a wrong answer: the verifier's verdict, how far off, and the plan."""
    value = eval(equation, {"__builtins__": {}})         # our own + - * of ints: exact
    off = f"{abs(value - target)} too {'high' if value > target else 'low'}"
    numbers = ", ".join(map(str, nums))
    return (f"My equation {equation} {feedback}: {off}. I will combine {numbers} in another way, using each "
            f"number once, to reach exactly {target}.")


def labelled_rows(tokenizer, task_name: str, labelled, reflections: bool) -> list[tuple[list, list]]:
    """(prompt ids, target ids) rows for finetune.train_model: each puzzle's answer; with `reflections` also
    the reflection after a wrong answer and the retry after it, in the turns rrr.py builds (next_turn_ids)."""
    def ids(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]

    task, eos, rng = get_task(task_name), tokenizer.eos_token_id, random.Random(WARM_SEED)
    rows = []
    for n, t, answer in labelled:
        question = chat_ids(tokenizer, prompt(n, t))
        rows.append((question, ids(answer)))
        if reflections:
            equation, feedback = wrong_answer(n, t, rng)
            asked = question + ids(f"<answer> {equation} </answer>") + next_turn_ids(
                tokenizer, task.reflection_prompt, eos)
            reflection = ids(reflection_label(n, t, equation, feedback))
            rows.append((asked, reflection))
            rows.append((asked + reflection + next_turn_ids(tokenizer, task.retry_prompt, eos), ids(answer)))
    return rows


def warm_start(d, task_name: str, puzzles: int, base_model: str | None, data_dir=None, bf16: bool = False,
               schedule: tuple[str, float] = DEFAULT_SCHEDULE, reflections: bool = False
               ) -> tuple[Path, dict]:
    """The warm-started model's folder (built on first use, a collective) and its description."""
    from finetune import train_model

    check_warm_start(task_name, puzzles)
    # The cache folder is named by every setting the weights depend on; the data folder only for the task
    # whose test split it changes (countdown_easy is always generated); the schedule and the reflections
    # only when they are not the default, so that the warm starts cached before they were settings keep
    # their folders.
    later = {} if schedule == DEFAULT_SCHEDULE else dict(lr_scheduler_type=schedule[0],
                                                         warmup_ratio=schedule[1])
    later |= dict(reflections=True) if reflections else {}
    key = json.dumps(dict(task=task_name, puzzles=puzzles,
                          model="embedded" if base_model in EMBEDDED_NAMES else base_model,
                          data_dir=data_dir_used(data_dir) if task_name == "countdown" else None, bf16=bf16,
                          lr=LEARNING_RATE, batch=BATCH_SIZE, seed=WARM_SEED, version=1, **later),
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    folder = cache_root() / "warm-start" / f"{task_name}-{puzzles}-{digest}"
    card = folder / "warm_start.json"
    if not card.exists():
        started = time.time()
        tokenizer = load_tokenizer(base_model)
        labelled, left_out = labelled_examples(task_name, puzzles, data_dir)
        data = labelled_rows(tokenizer, task_name, labelled, reflections)
        if d.main:
            print(f"warm start: fine-tuning on {puzzles} solver-written {task_name} answers"
                  f"{' with reflections' if reflections else ''} (once; cached in {folder})", flush=True)
        settings = SimpleNamespace(lora_r=0, lora_alpha=16, seed=WARM_SEED, bf16=bf16, epochs=1,
                                   gradient_checkpointing=False, learning_rate=LEARNING_RATE,
                                   lr_scheduler_type=schedule[0], warmup_ratio=schedule[1],
                                   batch_size=BATCH_SIZE, micro_batch_size=BATCH_SIZE, save_total_limit=1)
        train_model(settings, d, base_model, data, folder)
        if d.main:
            nums, target, answer = labelled[0]
            description = DESCRIPTION.format(puzzles=puzzles, task=task_name)
            description += REFLECTIONS if reflections else ""
            write_json(card, dict(description=description, reflections=reflections,
                                  task=task_name, puzzles=puzzles, base_model=base_model, data_dir=data_dir,
                                  left_out_as_test=left_out, learning_rate=LEARNING_RATE,
                                  lr_scheduler_type=schedule[0], warmup_ratio=schedule[1],
                                  batch_size=BATCH_SIZE, epochs=1, seed=WARM_SEED, bf16=bf16,
                                  seconds=round(time.time() - started, 1),
                                  example=dict(nums=nums, target=target, answer=answer)))
        par.barrier()
    return folder, json.loads(card.read_text())


def model_for_run(cfg, d) -> tuple[str, dict | None]:
    """What rrr.py trains from: --model, or with --warm-start the warm-started model (made on first use),
    and the description a run records of it (None without a warm start)."""
    if not cfg.warm_start:
        return cfg.model, None
    folder, card = warm_start(d, cfg.task, cfg.warm_start, cfg.model, cfg.data_dir, cfg.bf16,
                              reflections=cfg.warm_start_reflections)
    return str(folder), dict(description=card["description"], folder=folder.name)


def run(argv=None):
    args = parse_args(argv)
    d = par.init_distributed()
    try:
        bf16 = bf16_by_default(d.device) if args.bf16 is None else args.bf16
        folder, card = warm_start(d, args.task, args.puzzles, args.model, args.data_dir, bf16,
                                  (args.lr_scheduler_type, args.warmup_ratio), args.reflections)
        if d.main:
            print(f"{folder}\n{card['description']}")
    finally:
        par.close_distributed()


if __name__ == "__main__":
    main_guard(run)
