"""MBPP: write a Python function that passes the given asserts; the verifier runs them in a sandbox.

reference: {"tests": [assert, ...], "setup": test_setup_code, "text": the task, "code": the reference
solution}. Splits by task_id, the standard ones: prompt 1-10, test 11-510, validation 511-600,
train 601-974. Offline: data/samples/mbpp.jsonl (small problems written for this project, split the
same way by their own task ids: prompt 1-2, test 3-14, validation 15-16, train 17-40).
"""

from data import REFLECT_ANSWER, SAMPLES, DataError, Example, Verifier, make_task, read_jsonl_lines

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
    examples = []
    for line, row in read_jsonl_lines(path, required=("text", "code", "task_id", "test_list")):
        where = f"{path} line {line}"
        tests, setup = row["test_list"], row.get("test_setup_code") or ""
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise DataError(f"{where}: 'test_list' must be a non-empty list of assert strings")
        if type(row["task_id"]) is not int or not isinstance(row["text"], str) or not isinstance(setup, str):
            raise DataError(f"{where}: 'task_id' must be an integer, 'text' and 'test_setup_code' strings")
        if low <= row["task_id"] <= high:
            examples.append(Example(f"mbpp-{row['task_id']}", prompt(row["text"], tests),
                                    dict(tests=tests, setup=setup, text=row["text"], code=row["code"])))
    return examples


def check_batch(completions, examples):
    # One sandboxed process per program, run in parallel.
    from verifiers import check_code_batch
    return check_code_batch([(c, ex.reference["tests"], ex.reference["setup"]) for c, ex in zip(completions, examples)])


TASK = make_task("mbpp", reflection_prompt=REFLECT_ANSWER, answer_format=FORMAT, loader=load,
                 verifier=Verifier("check_code", "tests", "setup"), batch_checker=check_batch,
                 splits=("train", "test", "validation", "prompt"))
