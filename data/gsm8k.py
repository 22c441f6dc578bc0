"""GSM8K: grade-school word problems with a numeric answer (the forgetting check).

reference: {"answer": the data set's answer text, ending in "#### N"}. Offline:
data/samples/gsm8k.jsonl, word problems written for this project in the same shape.
"""

from data import REFLECT_ANSWER, SAMPLES, DataError, Example, Task, read_jsonl

FORMAT = "Reason step by step, then give the final number on its own last line as: #### <number>"


def load(split, data_dir, seed, size) -> list[Example]:
    if data_dir is None:
        rows = read_jsonl(SAMPLES / "gsm8k.jsonl", required=("question", "answer", "split"))
        rows = [r for r in rows if r["split"] == split]
    else:
        rows = read_jsonl(data_dir / "gsm8k" / f"{split}.jsonl", required=("question", "answer"))
    return [Example(f"gsm8k-{split}-{n}", [{"role": "user", "content": f"{r['question']}\n\n{FORMAT}"}],
                    dict(answer=r["answer"])) for n, r in enumerate(rows)]


def check(completion, example):
    from verifiers import check_math
    return check_math(completion, example.reference["answer"])


TASK = Task("gsm8k", reflection_prompt=REFLECT_ANSWER,
            retry_prompt="Try the problem again, using your reflection. " + FORMAT,
            answer_format=FORMAT, loader=load, checker=check)
