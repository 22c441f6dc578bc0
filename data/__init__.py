"""Tasks: loaders for the real data formats, offline data, prompts, and the verifier of each task.

    task = get_task("countdown")              # one of TASKS
    train = task.load("train", data_dir=resolve_data_dir(None), size=100, seed=0)
    task, train, test = load_splits("countdown", None, 100, 32, seed=0)   # both splits, never empty
    verdicts = task.check_batch(completions, train[:len(completions)])

The data folder (`--data-dir`, else $RRR_DATA_DIR, else none: offline) is laid out as
    countdown/countdown_3to4_{train,test}.jsonl        TinyZero rows {"target", "nums"}
    function_calling/xlam_function_calling_60k.json    APIGen rows {"query", "tools", "answers"} (optional)
    function_calling/apibank_hammer/*.json             API-Bank in the same shape
    function_calling/bfcl/BFCL_v4_*.json + possible_answer/   BFCL JSON Lines
    mbpp/mbpp.jsonl                                    the 974 MBPP problems
    gsm8k/{train,test}.jsonl                           {"question", "answer"}
Offline (no data folder), Countdown puzzles are generated and the other tasks use the small samples
written for this project in data/samples/. Each task's module says how its splits are drawn. `size` keeps
the first `size` examples of a fixed order: a shuffle seeded by `seed` for train and by 0 for the other
splits (so runs with different seeds are scored on the same examples), or the file's own order where it is
already random (Countdown).
"""

import bisect
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runs import BadInput
from verifiers import stop_if_unjudged

SAMPLES = Path(__file__).resolve().parent / "samples"

# The RRR paper's reflection prompts, verbatim.
REFLECT_TOOL = ("You tried performing the task, but failed in generating the correct tool call. Reflect on "
                "what went wrong and write a short explanation that will help you do better next time.")
REFLECT_ANSWER = ("You tried solving the problem and got the wrong answer. Reflect on what went wrong and "
                  "write a short explanation that will help you do better next time.")


class DataError(BadInput):
    """A missing or malformed data file; the message names the file (and line)."""


@dataclass
class Example:
    id: str                  # stable across runs, e.g. "mbpp-601", "bfcl-simple_python_3"
    messages: list[dict]     # the task prompt as chat messages (a system message, then the user's turn)
    reference: dict          # what the verifier needs (see each task module)


@dataclass(frozen=True)
class Task:
    name: str
    reflection_prompt: str                          # the RRR paper's, verbatim
    answer_format: str                              # how every prompt asks for the answer
    loader: Callable = field(repr=False)            # (split, data_dir, seed, size) -> examples in file order
    verifier: Callable = field(repr=False)          # (completion, example) -> Verdict
    batch_verifier: Callable | None = field(default=None, repr=False)   # the same for lists, where faster
    splits: tuple = ("train", "test")
    shuffle: bool = True                            # False where the source is already in random order
    retry_noun: str = "task"

    @property
    def retry_prompt(self) -> str:
        return f"Now try the {self.retry_noun} again, using your reflection. {self.answer_format}"

    def load(self, split: str, data_dir=None, size: int | None = None, seed: int = 0) -> list[Example]:
        if split not in self.splits:
            raise DataError(f"task {self.name} has splits {', '.join(self.splits)}, not {split!r}")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise DataError(f"size must be a non-negative integer or None, not {size!r}")
        examples = self.loader(split, Path(data_dir) if data_dir else None, seed, size)
        seen = set()
        for ex in examples:
            if ex.id in seen:
                raise DataError(f"task {self.name}, split {split}: duplicate example id {ex.id!r}")
            seen.add(ex.id)
        if self.shuffle:
            random.Random(f"{self.name}/{split}/{seed if split == 'train' else 0}").shuffle(examples)
        return examples if size is None else examples[:size]

    def check(self, completion: str, example: Example):
        return self.verifier(completion, example)

    def check_batch(self, completions: list[str], examples: list[Example]) -> list:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        if self.batch_verifier is not None:
            return stop_if_unjudged(self.batch_verifier(completions, examples))
        return stop_if_unjudged([self.verifier(c, ex) for c, ex in zip(completions, examples)])


def resolve_data_dir(flag_value) -> Path | None:
    """--data-dir, else $RRR_DATA_DIR, else None (offline data)."""
    value = flag_value or os.environ.get("RRR_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist")
    return path


def data_dir_used(flag_value) -> str | None:
    """--data-dir as a run records it and keys its caches on: $RRR_DATA_DIR counts as much as the flag."""
    folder = resolve_data_dir(flag_value)
    return None if folder is None else str(folder)


TASKS = ("countdown", "countdown_easy", "function_calling", "mbpp", "gsm8k")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    from data import countdown, function_calling, gsm8k, mbpp      # each imports this module
    return {"countdown": countdown.TASK, "countdown_easy": countdown.EASY_TASK,
            "function_calling": function_calling.TASK, "mbpp": mbpp.TASK, "gsm8k": gsm8k.TASK}[name]


def check_split(task_name: str, split: str, flag: str):
    """One line, before a run starts, for a split its task does not have (a flag such as --eval-split)."""
    task = get_task(task_name)
    if split not in task.splits:
        raise DataError(f"{flag} {split}: task {task_name} has no {split} split (it has "
                        f"{', '.join(task.splits)})")


def load_splits(task_name: str, data_dir, train_size: int | None, eval_size: int | None,
                seed: int, eval_split: str = "test") -> tuple[Task, list[Example], list[Example]]:
    """The task and its train and evaluation examples (the test split, or `eval_split`: Countdown's dev),
    as every script loads them. An empty split is a DataError: no run can learn from, or be scored on,
    nothing."""
    task = get_task(task_name)
    folder = resolve_data_dir(data_dir)
    train = task.load("train", data_dir=folder, size=train_size, seed=seed)
    scored = task.load(eval_split, data_dir=folder, size=eval_size, seed=seed)
    if not train or not scored:
        raise DataError(f"task {task_name}: empty split (train {len(train)}, {eval_split} {len(scored)})")
    return task, train, scored


def test_split_size(task: Task, data_dir, seed: int, split: str = "test") -> int:
    """The whole test split's (or `split`'s) size, for a report's "40 of 500". A load of its own: Countdown's
    offline loader generates `size` puzzles, so a run's --eval-size examples are not the first ones of a
    full load."""
    return len(task.load(split, data_dir=resolve_data_dir(data_dir), seed=seed))


def reflector_messages(task: Task, example: Example, failed: str, feedback: str) -> list[dict]:
    """Re-ReST's reflector prompt: the problem, the failed solution and the environment's feedback
    (verbatim), asking for a corrected solution in the task's answer format."""
    problem = "\n\n".join(m["content"] for m in example.messages)
    text = (f"Here is a task, an attempt at it that failed, and the feedback from checking that attempt.\n\n"
            f"### Task\n{problem}\n\n### Failed attempt\n{failed}\n\n### Feedback\n{feedback}\n\n"
            f"Write a corrected solution to the task. {task.answer_format}")
    return [{"role": "user", "content": text}]


# --- reading files with errors that name the file and line ------------------------------------------

def check_fields(row, required: tuple, where: str):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in required:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r}")


def read_jsonl_lines(path: Path, required: tuple = ()) -> list[tuple[int, dict]]:
    """(line number, row) for each row of a JSON Lines file (blank lines skipped)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            check_fields(row, required, f"{path} line {n}")
            rows.append((n, row))
    return rows


SPACE = re.compile(r"[ \t\r\n]*")      # JSON's whitespace


def read_json_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, row) for each element of a file holding one JSON list. The elements are decoded
    one at a time so that an error, or a row that fails a later check, can name its line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    decoder, rows = json.JSONDecoder(), []
    newlines = [m.start() for m in re.finditer("\n", text)]        # a count per row would be quadratic
    line_of = lambda pos: bisect.bisect_left(newlines, pos) + 1  # noqa: E731
    pos = SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise DataError(f"{path} line {line_of(pos)}: expected a JSON list of rows")
    pos = SPACE.match(text, pos + 1).end()
    while not text.startswith("]", pos):
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        rows.append((line_of(pos), row))
        pos = SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = SPACE.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise DataError(f"{path} line {line_of(pos)}: expected ',' or ']' after a row")
    if text[pos + 1:].strip():
        raise DataError(f"{path} line {line_of(pos + 1)}: extra data after the list")
    return rows
