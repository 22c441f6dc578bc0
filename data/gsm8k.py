"""GSM8K: grade-school word problems with a numeric answer (the forgetting check).

reference: {"answer": the data set's answer text, ending in "#### N"}. Real rows: <data_dir>/gsm8k/
{train,test}.jsonl. Offline: data/samples/gsm8k.jsonl, word problems written for this project in the same
shape plus a "split" field.
"""

import re

from data import REFLECT_ANSWER, SAMPLES, DataError, Example, Verifier, make_task, read_jsonl_lines

FORMAT = "Reason step by step, then give the final number on its own last line as: #### <number>"
FINAL = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")


def load(split, data_dir, seed, size) -> list[Example]:
    if data_dir is None:
        path = SAMPLES / "gsm8k.jsonl"
        rows = read_jsonl_lines(path, required=("question", "answer", "split"))
        rows = [(line, row) for line, row in rows if row["split"] == split]
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


TASK = make_task("gsm8k", reflection_prompt=REFLECT_ANSWER, answer_format=FORMAT, loader=load,
                 verifier=Verifier("check_math", "answer"), retry_noun="problem")
