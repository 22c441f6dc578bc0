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

import os
from pathlib import Path

from data import countdown, function_calling, gsm8k, mbpp
from data.common import DataError, Example, Task


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
