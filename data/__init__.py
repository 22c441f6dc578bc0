"""Tasks: loaders for the real data formats, offline data, prompts, and the verifier of each task.

    task = get_task("countdown")              # countdown | function_calling | mbpp | gsm8k
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
Offline (no data folder), Countdown puzzles are generated and checked by a solver, and the other tasks
use the small samples written for this project in data/samples/: 30 function-calling rows in the xLAM
shape (8 with two calls), 40 MBPP-style problems, 20 GSM8K-style word problems.

Splits: "train" and "test" for every task; MBPP also "validation" and "prompt" (by task_id, the
standard ranges); function calling by a hash of the request (one in five is test); GSM8K and
Countdown by file. `size` keeps the first `size` examples in a fixed order: a shuffle seeded by `seed`
for train (and by 0 for the other splits, so every run is scored on the same examples), or the file's
own order where it is already random (Countdown). Offline Countdown puzzles are generated with `seed`
for train and a fixed seed for test; a hash of each puzzle keeps the two sets apart.
"""

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runs import BadInput
from verifiers import stop_if_unjudged

SAMPLES = Path(__file__).resolve().parent / "samples"

# The RRR paper's reflection prompts, verbatim.
REFLECT_TOOL = ("You tried performing the task, but failed in generating the correct tool call. Reflect on what "
                "went wrong and write a short explanation that will help you do better next time.")
REFLECT_ANSWER = ("You tried solving the problem and got the wrong answer. Reflect on what went wrong and write a "
                  "short explanation that will help you do better next time.")


class DataError(BadInput):
    """A missing or malformed data file; the message names the file (and line)."""


@dataclass
class Example:
    id: str                  # stable across runs, e.g. "mbpp-601", "bfcl-simple_python_3", "countdown-train-17"
    messages: list[dict]     # the task prompt as chat messages (a system message, then the user's turn)
    reference: dict          # what the verifier needs (see each task module)


@dataclass(frozen=True)
class Task:
    name: str
    reflection_prompt: str                               # the RRR paper's, verbatim
    retry_prompt: str                                    # asks for attempt 2, in the task's answer format
    answer_format: str                                   # how the reflector is asked to answer
    loader: Callable = field(repr=False)                 # (split, data_dir, seed, size) -> examples in file order
    checker: Callable = field(repr=False)                # (completion, example) -> Verdict
    batch_checker: Callable | None = field(default=None, repr=False)
    splits: tuple = ("train", "test")
    shuffle: bool = True                                 # False where the source is already in random order

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
            # Only the training order follows the seed: runs with different seeds are scored on the same
            # evaluation examples.
            random.Random(f"{self.name}/{split}/{seed if split == 'train' else 0}").shuffle(examples)
        return examples if size is None else examples[:size]

    def check(self, completion: str, example: Example):
        return self.checker(completion, example)

    def check_batch(self, completions: list[str], examples: list[Example]) -> list:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        if self.batch_checker is not None:
            verdicts = self.batch_checker(completions, examples)
        else:
            verdicts = [self.checker(c, ex) for c, ex in zip(completions, examples)]
        return stop_if_unjudged(verdicts)


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
    """--data-dir as a run records it and keys its caches on: the folder that resolve_data_dir picks (so
    that $RRR_DATA_DIR counts as much as the flag), or None for the offline data."""
    folder = resolve_data_dir(flag_value)
    return None if folder is None else str(folder)


class Verifier:
    """A task's `check` when it is one function of verifiers.py: `function(completion, *values)`, the values
    being the example's reference fields `fields` in order (a missing one is None). verifiers.py is imported
    on the first check, so loading data does not need it."""

    def __init__(self, function: str, *fields: str):
        self.function, self.fields = function, fields

    def __call__(self, completion: str, example: Example):
        import verifiers
        return getattr(verifiers, self.function)(completion, *(example.reference.get(f) for f in self.fields))

    def __repr__(self):
        return f"Verifier({self.function!r}, {', '.join(map(repr, self.fields))})"


def make_task(name: str, *, reflection_prompt: str, answer_format: str, loader: Callable, verifier: Verifier,
              retry_noun: str = "task", **options) -> Task:
    """A Task whose retry prompt is the usual one ("Now try the <retry_noun> again, using your reflection.")
    followed by the answer format; `options`: the other Task fields (batch_checker, splits, shuffle)."""
    return Task(name, reflection_prompt=reflection_prompt,
                retry_prompt=f"Now try the {retry_noun} again, using your reflection. " + answer_format,
                answer_format=answer_format, loader=loader, checker=verifier, **options)


TASKS = ("countdown", "countdown_easy", "function_calling", "mbpp", "gsm8k")     # every task the project has


def get_task(name: str) -> Task:
    from data import countdown, function_calling, gsm8k, mbpp
    tasks = {"countdown": countdown.TASK, "countdown_easy": countdown.EASY_TASK,
             "function_calling": function_calling.TASK, "mbpp": mbpp.TASK, "gsm8k": gsm8k.TASK}
    if name not in tasks:
        raise DataError(f"unknown task {name!r}; known: {', '.join(tasks)}")
    return tasks[name]


def load_splits(task_name: str, data_dir, train_size: int | None, eval_size: int | None,
                seed: int) -> tuple[Task, list[Example], list[Example]]:
    """The task and its train and test examples, as every script loads them. `data_dir` is --data-dir's
    value (resolve_data_dir: else $RRR_DATA_DIR, else offline data). An empty split is a DataError: no
    run can learn from, or be scored on, nothing."""
    task = get_task(task_name)
    folder = resolve_data_dir(data_dir)
    train = task.load("train", data_dir=folder, size=train_size, seed=seed)
    test = task.load("test", data_dir=folder, size=eval_size, seed=seed)
    if not train or not test:
        raise DataError(f"task {task_name}: empty split (train {len(train)}, test {len(test)})")
    return task, train, test


def test_split_size(task: Task, data_dir, seed: int) -> int:
    """The whole test split's size, for a report's "40 of 500". A load of its own: Countdown's offline loader
    generates `size` puzzles, so a run's --eval-size examples are not the first ones of a full load."""
    return len(task.load("test", data_dir=resolve_data_dir(data_dir), seed=seed))


def reflector_messages(task: Task, example: Example, failed: str, feedback: str) -> list[dict]:
    """Re-ReST's reflector prompt: the problem, the failed solution and the environment's feedback
    (verbatim), asking for a corrected solution in the task's answer format."""
    problem = "\n\n".join(m["content"] for m in example.messages)
    text = (f"Here is a task, an attempt at it that failed, and the feedback from checking that attempt.\n\n"
            f"### Task\n{problem}\n\n### Failed attempt\n{failed}\n\n### Feedback\n{feedback}\n\n"
            f"Write a corrected solution to the task. {task.answer_format}")
    return [{"role": "user", "content": text}]


# --- reading files with errors that name the file and line ------------------------------------------

def read_jsonl_lines(path: Path, required: tuple = ()) -> list[tuple[int, dict]]:
    """(line number, row) for each row of a JSON Lines file (blank lines skipped), so that later checks
    can name the line."""
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


def read_json_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, row) for each element of a file holding one JSON list. The elements are decoded
    one at a time so that an error, or a row that fails a later check, can name its line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    decoder, rows = json.JSONDecoder(), []
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise DataError(f"{path} line {line_of(pos)}: expected a JSON list of rows")
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        rows.append((line_of(pos), row))
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            raise DataError(f"{path} line {line_of(pos)}: expected ',' or ']' after a row")
    if text[pos + 1:].strip():
        raise DataError(f"{path} line {line_of(pos + 1)}: extra data after the list")
    return rows


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def check_fields(row, required: tuple, where: str):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in required:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r}")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
