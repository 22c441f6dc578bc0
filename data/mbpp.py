"""MBPP: write a Python function that passes the given asserts; the verifier runs them in a sandbox, and
then the problem's hidden tests (data/mbpp_hidden.py), which the prompt and the feedback never show.

reference: {"tests": [assert, ...], "setup": test_setup_code, "text": the task, "code": the reference
solution, "hidden": [hidden assert, ...]}. Splits by task_id, the standard ones: prompt 1-10, test 11-510,
validation 511-600, train 601-974. Offline: data/samples/mbpp.jsonl (small problems written for this
project, split the same way by their own task ids: prompt 1-2, test 3-14, validation 15-16, train 17-40).
"""

from data.common import REFLECT_ANSWER, SAMPLES, DataError, Example, Task, read_jsonl_lines
from data.mbpp_hidden import hidden_tests
from verifiers import Verdict, check_code, check_code_batch

SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
OFFLINE_SPLITS = {"prompt": (1, 2), "test": (3, 14), "validation": (15, 16), "train": (17, 40)}
FORMAT = "Answer with the complete Python code in a ```python block."


def prompt(text: str, tests: list[str]) -> list[dict]:
    # The protocol of the MBPP paper and Re-ReST, plus the answer format.
    tests_text = "\n".join(tests)
    return [{"role": "user", "content": f"You are an expert Python programmer, and here is your task: {text} "
                                        f"Your code should pass these tests:\n\n{tests_text}\n\n{FORMAT}"}]


def load(split, data_dir, seed, size) -> list[Example]:
    path = SAMPLES / "mbpp.jsonl" if data_dir is None else data_dir / "mbpp" / "mbpp.jsonl"
    low, high = (OFFLINE_SPLITS if data_dir is None else SPLITS)[split]
    rows = []
    for line, row in read_jsonl_lines(path, required=("text", "code", "task_id", "test_list")):
        where = f"{path} line {line}"
        tests, setup = row["test_list"], row.get("test_setup_code") or ""
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise DataError(f"{where}: 'test_list' must be a non-empty list of assert strings")
        if type(row["task_id"]) is not int or not isinstance(row["text"], str) or not isinstance(setup, str):
            raise DataError(f"{where}: 'task_id' must be an integer, 'text' and 'test_setup_code' strings")
        rows.append(dict(task_id=row["task_id"], text=row["text"], code=row["code"], tests=tests,
                         setup=setup))
    hidden = hidden_tests(path, rows)      # of the whole file: made once, cached
    return [Example(f"mbpp-{r['task_id']}", prompt(r["text"], r["tests"]),
                    dict(tests=r["tests"], setup=r["setup"], text=r["text"], code=r["code"],
                         hidden=hidden.get(str(r["task_id"]), [])))
            for r in rows if low <= r["task_id"] <= high]


def verify(completion: str, example: Example) -> Verdict:
    return check_code(completion, example.reference["tests"], example.reference["setup"],
                      example.reference.get("hidden"))


def verify_batch(completions: list[str], examples: list[Example]) -> list[Verdict]:
    # One sandboxed process per program, run in parallel; visible tests, then hidden ones.
    return check_code_batch([(c, ex.reference["tests"], ex.reference["setup"], ex.reference.get("hidden"))
                             for c, ex in zip(completions, examples)])


TASK = Task("mbpp", REFLECT_ANSWER, FORMAT, loader=load, verifier=verify, batch_verifier=verify_batch,
            splits=("train", "test", "validation", "prompt"))
