"""Tasks: loaders for the real data formats, offline data, prompts, and the verifier of each task.

    task = get_task("countdown")              # countdown | function_calling | mbpp | gsm8k
    train = task.load("train", data_dir=resolve_data_dir(None), size=100, seed=0)
    verdicts = task.check_batch(completions, train[:len(completions)])

The data folder (`--data-dir`, else $RRR_DATA_DIR, else none: offline) is laid out as
    countdown/countdown_3to4_{train,test}.jsonl        TinyZero rows {"target", "nums"}
    function_calling/xlam_function_calling_60k.json    APIGen rows {"query", "tools", "answers"} (optional)
    function_calling/apibank_hammer/*.json             API-Bank in the same shape
    function_calling/bfcl/BFCL_v4_*.json + possible_answer/   BFCL JSON Lines
    mbpp/mbpp.jsonl                                    the 974 MBPP problems
    gsm8k/{train,test}.jsonl                           {"question", "answer"}
Offline, Countdown puzzles are generated (and checked by a solver) and the other tasks use the small
hand-written samples in data/samples/.

Splits: "train" and "test" for every task; MBPP also "validation" and "prompt" (by task_id, the
standard ranges). `size` keeps the first `size` examples of a seeded shuffle.
"""

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SAMPLES = Path(__file__).resolve().parent / "samples"

# The RRR paper's reflection prompts, verbatim.
REFLECT_TOOL = ("You tried performing the task, but failed in generating the correct tool call. Reflect on what "
                "went wrong and write a short explanation that will help you do better next time.")
REFLECT_ANSWER = ("You tried solving the problem and got the wrong answer. Reflect on what went wrong and write a "
                  "short explanation that will help you do better next time.")


class DataError(Exception):
    """A missing or malformed data file; the message names the file (and line)."""


@dataclass
class Example:
    id: str                  # stable across runs, e.g. "mbpp-601"
    messages: list[dict]     # the task prompt as chat messages
    reference: dict          # what the verifier needs (see each task module)


@dataclass(frozen=True)
class Task:
    name: str
    reflection_prompt: str
    retry_prompt: str
    answer_format: str                                   # how the reflector is asked to answer
    loader: Callable = field(repr=False)                 # (split, data_dir, seed, size) -> list[Example]
    checker: Callable = field(repr=False)                # (completion, example) -> Verdict
    batch_checker: Callable | None = field(default=None, repr=False)
    splits: tuple = ("train", "test")

    def load(self, split: str, data_dir=None, size: int | None = None, seed: int = 0) -> list[Example]:
        if split not in self.splits:
            raise DataError(f"task {self.name} has splits {', '.join(self.splits)}, not {split!r}")
        examples = self.loader(split, Path(data_dir) if data_dir else None, seed, size)
        random.Random(f"{self.name}/{split}/{seed}").shuffle(examples)
        return examples if size is None else examples[:size]

    def check(self, completion: str, example: Example):
        return self.checker(completion, example)

    def check_batch(self, completions: list[str], examples: list[Example]) -> list:
        if self.batch_checker is not None:
            return self.batch_checker(completions, examples)
        return [self.checker(c, ex) for c, ex in zip(completions, examples)]


def resolve_data_dir(flag_value) -> Path | None:
    """--data-dir, else $RRR_DATA_DIR, else None (offline data)."""
    value = flag_value or os.environ.get("RRR_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist")
    return path


def get_task(name: str) -> Task:
    from data import countdown, function_calling, gsm8k, mbpp
    tasks = {"countdown": countdown.TASK, "function_calling": function_calling.TASK, "mbpp": mbpp.TASK,
             "gsm8k": gsm8k.TASK}
    if name not in tasks:
        raise DataError(f"unknown task {name!r}; known: {', '.join(tasks)}")
    return tasks[name]


def reflector_messages(task: Task, example: Example, failed: str, feedback: str) -> list[dict]:
    """Re-ReST's reflector prompt: the problem, the failed solution and the environment's feedback
    (verbatim), asking for a corrected solution in the task's answer format."""
    problem = "\n\n".join(m["content"] for m in example.messages if m["role"] != "assistant")
    text = (f"Here is a task and an attempt at it that failed.\n\n### Task\n{problem}\n\n### Failed attempt\n{failed}\n\n"
            f"### Feedback from running the attempt\n{feedback}\n\n"
            f"Write a corrected solution. {task.answer_format}")
    return [{"role": "user", "content": text}]


# --- reading files with errors that name the file and line ------------------------------------------

def read_jsonl(path: Path, required: tuple = ()) -> list[dict]:
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
            rows.append(row)
    return rows


def read_json(path: Path) -> object:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None


def check_fields(row, required: tuple, where: str):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in required:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r}")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
