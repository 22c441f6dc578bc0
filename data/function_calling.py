"""Function calling: given tools (JSON schemas) and a request, answer with the JSON list of calls.

reference: {"answers": [...]}, either the xLAM/APIGen form [{"name", "arguments"}] or BFCL's possible-answer
form [{function: {parameter: [acceptable values]}}] (verifiers.check_function_calls tells them apart); BFCL
examples also carry "tools", the row's function docs, whose declared types BFCL's rules check against.

Sources under <data_dir>/function_calling/; every one that is present is used:
- xlam_function_calling_60k.json: APIGen rows {"id", "query", "tools", "answers"} (tools and answers may be
  JSON strings). Gated on the Hugging Face hub: download it there and put it here.
- apibank_hammer/*.json: API-Bank levels 1 and 2 in the same shape; the query is a conversation, shown as a
  transcript since it ends on the assistant's side and a chat prompt must end with a user turn.
- bfcl/BFCL_v4_*.json (JSON Lines) with answers in bfcl/possible_answer/, matched by id: the single-turn
  categories with ground truth, Python only (Java and JavaScript give arguments as source text, which BFCL
  converts by rules of its own). Rows that no call can pass under BFCL's rules are skipped rather than
  rewritten: live_simple 106-63-0 and 112-68-0 list no acceptable value for required array parameters, and
  live_multiple 862-181-3 and 964-207-0 expect a parameter that the function's doc does not declare.
Train/test: an example is in the test split when the CRC-32 of its request (the query or conversation as
the file gives it) is divisible by 5: one in five, the same whatever the size and the seed, and a request
that appears twice (API-Bank repeats 26 rows) cannot land in both splits. Rows that repeat an earlier row's
prompt and answers are dropped. Offline: data/samples/function_calling.json.
"""

import json
import zlib

from data.common import (REFLECT_TOOL, SAMPLES, DataError, Example, Task, check_fields, read_json_rows,
                         read_jsonl_lines)
from verifiers import Verdict, check_function_calls

FORMAT = ('Answer with the calls as a JSON list, [{"name": "<function name>", "arguments": '
          '{<argument>: <value>}}], and nothing else.')
ROLE_NAMES = {"user": "User", "agent": "Assistant", "assistant": "Assistant", "tool": "Tool",
              "system": "System"}


def prompt(tools: list, turns: list[dict], extra_system: str = "") -> list[dict]:
    """A system message with the tools and the answer format, then the conversation (ending with the user)."""
    system = ("You can call these functions, described as JSON schemas:\n"
              + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + "\n\n" + FORMAT)
    if extra_system:
        system = extra_system + "\n\n" + system
    return [{"role": "system", "content": system}] + turns


def verify(completion: str, example: Example) -> Verdict:
    return check_function_calls(completion, example.reference["answers"], example.reference.get("tools"))


def _json_list(row, name, where) -> list:
    value = row[name]
    if isinstance(value, str):       # APIGen stores tools and answers as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field {name!r} is not valid JSON ({e.msg})") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name!r} must be a list")
    return value


def _request(query, where) -> list[dict]:
    if isinstance(query, str):
        return [{"role": "user", "content": query}]
    if isinstance(query, list) and all(isinstance(t, dict) and "content" in t for t in query):
        lines = [f"{ROLE_NAMES.get(t.get('role'), t.get('role'))}: {t['content']}" for t in query]
        return [{"role": "user", "content": "Here is a conversation between a user and an assistant:\n\n"
                 + "\n".join(lines) + "\n\nWrite the function call the assistant should make next."}]
    raise DataError(f"{where}: field 'query' must be a string or a list of turns with 'role' and 'content'")


def load_xlam_shape(path, prefix) -> list[tuple[object, Example]]:
    """(request, example) pairs; the request decides the split."""
    examples = []
    for n, (line, row) in enumerate(read_json_rows(path)):
        where = f"{path} line {line}"
        check_fields(row, ("query", "tools", "answers"), where)
        tools, answers = _json_list(row, "tools", where), _json_list(row, "answers", where)
        if not all(isinstance(a, dict) and isinstance(a.get("name"), str)
                   and isinstance(a.get("arguments"), dict) for a in answers):
            raise DataError(f"{where}: each answer must be {{\"name\": str, \"arguments\": {{...}}}}")
        messages = prompt(tools, _request(row["query"], where))
        example = Example(f"{prefix}-{row.get('id', n)}", messages, dict(answers=answers))
        examples.append((row["query"], example))
    return examples


def load_bfcl(folder) -> list[tuple[object, Example]]:
    examples = []
    for path in sorted(folder.glob("BFCL_v4_*.json")):
        answers_path = folder / "possible_answer" / path.name
        if not answers_path.exists() or "java" in path.name:      # also skips javascript
            continue
        truth = {row["id"]: row["ground_truth"]
                 for _, row in read_jsonl_lines(answers_path, required=("id", "ground_truth"))}
        for line, row in read_jsonl_lines(path, required=("id", "question", "function")):
            where = f"{path} line {line}"
            if row["id"] not in truth:
                raise DataError(f"{where}: no possible answer for id {row['id']!r} in {answers_path}")
            # question is a list of turns per conversation round; the single-turn categories have one.
            question = row["question"]
            turns = question[0] if question and isinstance(question[0], list) else question
            well_formed = isinstance(turns, list) and all(isinstance(t, dict) and "role" in t for t in turns)
            if not (well_formed and turns and turns[-1]["role"] == "user"):
                raise DataError(f"{where}: 'question' must be a list of turns ending with a user turn")
            if not _passable(truth[row["id"]], row["function"]):
                continue
            system = "\n\n".join(t["content"] for t in turns if t["role"] == "system")
            chat = [{"role": t["role"], "content": t["content"]} for t in turns if t["role"] != "system"]
            examples.append((turns, Example(f"bfcl-{row['id']}", prompt(row["function"], chat, system),
                                            dict(answers=truth[row["id"]], tools=row["function"]))))
    return examples


def _passable(answers, tools) -> bool:
    """False when some expected call cannot pass BFCL's checks whatever its arguments: a parameter with no
    acceptable value, or one that must be given (no "" among its values) but is not in the function's doc."""
    docs = {t.get("name"): (t.get("parameters") or {}).get("properties") or {}
            for t in tools if isinstance(t, dict)}
    return not any(acceptable == [] or ("" not in acceptable and key not in docs.get(name, {}))
                   for answer in answers for name, params in answer.items()
                   for key, acceptable in params.items())


def load(split, data_dir, seed, size) -> list[Example]:
    if data_dir is None:
        examples = load_xlam_shape(SAMPLES / "function_calling.json", "sample")
    else:
        base = data_dir / "function_calling"
        if not base.is_dir():
            raise DataError(f"{base}: folder not found")
        xlam = base / "xlam_function_calling_60k.json"
        examples = load_xlam_shape(xlam, "xlam") if xlam.exists() else []
        for path in sorted((base / "apibank_hammer").glob("*.json")):
            examples += load_xlam_shape(path, path.stem)
        examples += load_bfcl(base / "bfcl")
        if not examples:
            raise DataError(f"{base}: no function-calling data found (see data/__init__.py for the layout)")
    chosen, seen = [], set()
    for request, ex in examples:
        key = json.dumps([ex.messages, ex.reference], sort_keys=True)
        in_test = zlib.crc32(json.dumps(request, sort_keys=True).encode()) % 5 == 0
        if key not in seen and in_test == (split == "test"):
            seen.add(key)
            chosen.append(ex)
    return chosen


TASK = Task("function_calling", REFLECT_TOOL, FORMAT, loader=load, verifier=verify)
