"""GSM8K: grade-school word problems with a numeric answer (the forgetting check).

reference: {"answer": the data set's answer text, ending in "#### N"}. Real rows: <data_dir>/gsm8k/
{train,test}.jsonl. Offline: data/samples/gsm8k.jsonl, word problems written for this project in the same
shape plus a "split" field.
"""

import re

from data.common import REFLECT_ANSWER, SAMPLES, DataError, Example, Task, read_jsonl_lines
from verifiers import Verdict, check_math

FORMAT = "Reason step by step, then give the final number on its own last line as: #### <number>"
FINAL = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")


def load(split, data_dir, seed, size) -> list[Example]:
    if data_dir is None:
        path = SAMPLES / "gsm8k.jsonl"
        rows = [(line, row) for line, row in read_jsonl_lines(path, required=("question", "answer", "split"))
                if row["split"] == split]
    else:
        path = data_dir / "gsm8k" / f"{split}.jsonl"
        rows = read_jsonl_lines(path, required=("question", "answer"))
    examples = []
    for line, row in rows:
        # Checked here so that a bad row fails at load time, not in the middle of a run.
        if not isinstance(row["answer"], str) or not FINAL.search(row["answer"]):
            raise DataError(f"{path} line {line}: 'answer' must end with '#### <number>'")
        messages = [{"role": "user", "content": f"{row['question']}\n\n{FORMAT}"}]
        examples.append(Example(f"gsm8k-{split}-{line}", messages, dict(answer=row["answer"])))
    return examples


def verify(completion: str, example: Example) -> Verdict:
    return check_math(completion, example.reference["answer"])


TASK = Task("gsm8k", REFLECT_ANSWER, FORMAT, loader=load, verifier=verify, retry_noun="problem")
