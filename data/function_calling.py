"""Function calling: given tools (JSON schemas) and a request, answer with the JSON list of calls.

reference: {"answers": [...]}, either the xLAM/APIGen form [{"name", "arguments"}] or BFCL's possible-
answer form [{function: {parameter: [acceptable values]}}] (verifiers.check_function_calls tells them apart).

Sources under <data_dir>/function_calling/, all that are present are used:
- xlam_function_calling_60k.json: APIGen rows {"id", "query", "tools", "answers"} (tools and answers may be
  JSON strings). Gated on the Hugging Face hub: download it there and put it here.
- apibank_hammer/*.json: API-Bank level 1 and 2 in the same shape; the query is a conversation.
- bfcl/BFCL_v4_*.json with bfcl/possible_answer/: BFCL's single-turn categories that have ground truth
  (Python only: the Java and JavaScript ones describe arguments as source text).
Train/test: an example is in the test split when a hash of its id falls in one fifth of the range, so the
split is the same whatever --train-size, --eval-size and the seed. Offline: data/samples/function_calling.json.
"""

import json
import zlib

from data import REFLECT_TOOL, SAMPLES, DataError, Example, Task, check_fields, read_json, read_jsonl

FORMAT = ('Answer with the calls as a JSON list, [{"name": "<function name>", "arguments": {<argument>: <value>}}], '
          "and nothing else. Use [] when no function fits the request.")


def prompt(tools: list, request: str) -> list[dict]:
    system = ("You can call these functions, described as JSON schemas:\n"
              + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n\n" + FORMAT)
    return [{"role": "system", "content": system}, {"role": "user", "content": request}]


def in_test(example_id: str) -> bool:
    return zlib.crc32(example_id.encode()) % 5 == 0


def _json_field(row, name, where):
    value = row[name]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field {name!r} is not valid JSON ({e.msg})") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name!r} must be a list")
    return value


def _request(query, where) -> str:
    if isinstance(query, str):
        return query
    if isinstance(query, list):      # API-Bank: a conversation; the calls answer its last request
        names = {"user": "User", "agent": "Assistant", "assistant": "Assistant"}
        return "\n".join(f"{names.get(t.get('role'), t.get('role'))}: {t.get('content', '')}" for t in query)
    raise DataError(f"{where}: field 'query' must be a string or a list of turns")


def load_xlam_shape(path, prefix) -> list[Example]:
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows")
    examples = []
    for n, row in enumerate(rows):
        where = f"{path} row {n}"
        check_fields(row, ("query", "tools", "answers"), where)
        tools, answers = _json_field(row, "tools", where), _json_field(row, "answers", where)
        examples.append(Example(f"{prefix}-{row.get('id', n)}", prompt(tools, _request(row["query"], where)),
                                dict(answers=answers)))
    return examples


def load_bfcl(folder) -> list[Example]:
    examples = []
    for path in sorted(folder.glob("BFCL_v4_*.json")):
        answers_path = folder / "possible_answer" / path.name
        if not answers_path.exists() or "java" in path.name:
            continue
        truth = {r["id"]: r["ground_truth"] for r in read_jsonl(answers_path, required=("id", "ground_truth"))}
        for n, row in enumerate(read_jsonl(path, required=("id", "question", "function")), 1):
            if row["id"] not in truth:
                raise DataError(f"{path} line {n}: no possible answer for id {row['id']!r} in {answers_path}")
            turns = row["question"][0] if row["question"] and isinstance(row["question"][0], list) else row["question"]
            request = "\n".join(t["content"] for t in turns if t.get("role") == "user")
            examples.append(Example(f"bfcl-{row['id']}", prompt(row["function"], request),
                                    dict(answers=truth[row["id"]])))
    return examples


def load(split, data_dir, seed, size) -> list[Example]:
    if data_dir is None:
        examples = load_xlam_shape(SAMPLES / "function_calling.json", "sample")
    else:
        base = data_dir / "function_calling"
        if not base.is_dir():
            raise DataError(f"{base}: folder not found")
        examples = []
        if (base / "xlam_function_calling_60k.json").exists():
            examples += load_xlam_shape(base / "xlam_function_calling_60k.json", "xlam")
        for path in sorted((base / "apibank_hammer").glob("*.json")):
            examples += load_xlam_shape(path, path.stem)
        if (base / "bfcl").is_dir():
            examples += load_bfcl(base / "bfcl")
        if not examples:
            raise DataError(f"{base}: no function-calling data found (see data/__init__.py for the layout)")
    return [ex for ex in examples if in_test(ex.id) == (split == "test")]


def check(completion, example):
    from verifiers import check_function_calls
    return check_function_calls(completion, example.reference["answers"])


TASK = Task("function_calling", reflection_prompt=REFLECT_TOOL,
            retry_prompt="Try the task again, using your reflection. " + FORMAT,
            answer_format=FORMAT, loader=load, checker=check)
