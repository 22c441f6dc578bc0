"""`verifiers.check_function_calls` against an independent reference of BFCL's AST checker rules
(tests/bfcl_reference.py) on a mutation corpus built from every Python BFCL category with answers."""

import json
import random
import time
from collections import Counter

import pytest

from bfcl_reference import candidate_answers, official_verdict, standardise
from tiny import shared_data_dir

CATEGORIES = ["simple_python", "multiple", "parallel", "parallel_multiple",
              "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple"]
SEED = 20241122
MIN_AGREEMENT = 0.995


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _bfcl(category):
    """[(id, ground_truth, functions)] for one category, questions and answers matched by id."""
    folder = shared_data_dir() / "function_calling" / "bfcl"
    questions, answers = folder / f"BFCL_v4_{category}.json", folder / "possible_answer" / f"BFCL_v4_{category}.json"
    if not (questions.is_file() and answers.is_file()):
        pytest.skip(f"BFCL data for {category} not found under {folder}")
    functions = {row["id"]: row["function"] for row in _jsonl(questions)}
    return [(row["id"], row["ground_truth"], functions[row["id"]]) for row in _jsonl(answers)]


# ---------------------------------------------------------------- the reference, by hand

DOC = {"name": "find", "parameters": {"type": "dict", "required": ["city"], "properties": {
    "city": {"type": "string"}, "count": {"type": "integer"}, "ratio": {"type": "float"},
    "flag": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}},
    "points": {"type": "array", "items": {"type": "float"}},
    "filters": {"type": "dict", "properties": {"kind": {"type": "string"}, "open": {"type": "boolean"}}}}}}
GT = [{"find": {"city": ["New York"], "count": ["", 5], "ratio": [2.0, ""], "flag": ["", True],
                "tags": ["", ["a b", "c"]], "points": ["", [1.0, 2.5]],
                "filters": ["", {"kind": ["park"], "open": ["", True]}]}}]


def _verdict(name="find", gt=GT, docs=(DOC,), **arguments):
    arguments.setdefault("city", "New York")
    return official_verdict([{"name": name, "arguments": arguments}], gt, list(docs))


def test_reference_strings_by_hand():
    assert standardise("New York, N.Y.") == "newyorkny"
    assert standardise("It's") == 'it"s'
    assert _verdict(city="new-york") and _verdict(city="NEW YORK,") and _verdict(city="New_York.")
    assert not _verdict(city="New\tYork")  # only the plain space is dropped
    assert not _verdict(city="New\nYork") and not _verdict(city="New York!") and not _verdict(city="Newark")
    assert _verdict(tags=["A-B", "c"]) and not _verdict(tags=["c", "a b"])  # lists: items standardised, ordered
    quoted = [{"find": {"city": ["Joe's"]}}]
    assert _verdict(gt=quoted, city='joe"s') and not _verdict(gt=quoted, city="joes")
    # Acceptable values not of the declared type are compared as-is ("variables"): no standardisation.
    flag_as_text = [{"find": {"city": ["New York"], "flag": ["True"]}}]
    assert _verdict(gt=flag_as_text, flag="True")
    assert not _verdict(gt=flag_as_text, flag="true") and not _verdict(gt=flag_as_text, flag=True)


def test_reference_numbers_by_hand():
    assert _verdict(ratio=2) and _verdict(ratio=2.0)  # int accepted for a float param
    assert _verdict(count=5) and not _verdict(count=5.0) and not _verdict(count="5")
    assert not _verdict(count=True) and not _verdict(flag=1) and _verdict(flag=True)
    points = [{"find": {"city": ["New York"], "points": [[1.0, 2.5]]}}]
    assert _verdict(gt=points, points=[1.0, 2.5]) and not _verdict(gt=points, points=[1, 2.5])  # items: exact type
    assert _verdict(points=[1, 2.5])  # ...unless "" is acceptable too: it lets any item types through
    assert _verdict(filters={"kind": "Park", "open": 1})  # dict values: plain == (1 == True), no type check


def test_reference_structure_and_parallel_pairing_by_hand():
    assert _verdict()  # every other param is optional ("" acceptable)
    assert not official_verdict([{"name": "find", "arguments": {"count": 5}}], GT, [DOC])  # required missing
    assert not _verdict(zz=1) and not _verdict(name="Find")
    assert _verdict(tags=[])  # "" among a list param's acceptable values also accepts []
    assert _verdict(filters={"kind": "park"}) and not _verdict(filters={"open": True})
    assert not _verdict(filters={"kind": "park", "x": 1})
    call = {"name": "find", "arguments": {"city": "New York"}}
    assert not official_verdict([call, call], GT, [DOC]) and not official_verdict([], GT, [DOC])
    # Parallel: each answer in turn takes the first unpaired call that fits; no backtracking.
    gt = [{"f": {"a": ["x", "y"]}}, {"f": {"a": ["x"]}}]
    doc = {"name": "f", "parameters": {"type": "dict", "required": ["a"], "properties": {"a": {"type": "string"}}}}
    x, y = ({"name": "f", "arguments": {"a": v}} for v in "xy")
    assert official_verdict([y, x], gt, [doc]) and official_verdict([x, x], gt, [doc])
    assert not official_verdict([x, y], gt, [doc])  # x goes to the first answer, y fits neither left


# ---------------------------------------------------------------- the differential test


def test_check_function_calls_agrees_with_bfcl_reference():
    from verifiers import check_function_calls

    start = time.perf_counter()
    rng = random.Random(SEED)
    total, disagree, verdicts, examples = Counter(), Counter(), Counter(), []
    for category in CATEGORIES:
        for item_id, ground_truth, functions in _bfcl(category):
            # The reference has no category argument: it relies on these holding for the data.
            assert "parallel" in category or len(ground_truth) == 1, item_id
            assert all(name in {f["name"] for f in functions} for entry in ground_truth for name in entry)
            for calls in candidate_answers(ground_truth, functions, rng):
                want = official_verdict(calls, ground_truth, functions)
                got = check_function_calls(json.dumps(calls, ensure_ascii=False), ground_truth, functions).ok
                total[category] += 1
                verdicts[want] += 1
                if got != want:
                    disagree[category] += 1
                    if len(examples) < 10:
                        examples.append(f"{item_id}: official={want} production={got}\n"
                                        f"    candidate: {json.dumps(calls)[:400]}\n"
                                        f"    answer:    {json.dumps(ground_truth)[:400]}")
    n = sum(total.values())
    report = "\n".join([f"{n} candidates ({verdicts[True]} accepted by the reference) in "
                        f"{time.perf_counter() - start:.1f} s; disagreement per category:"]
                       + [f"  {c}: {disagree[c]}/{total[c]} = {disagree[c] / total[c]:.2%}" for c in CATEGORIES]
                       + ["first disagreements:"] + examples)
    print(report)
    assert verdicts[True] > 0.15 * n and verdicts[False] > 0.15 * n, report  # the corpus has both kinds
    assert 1 - sum(disagree.values()) / n >= MIN_AGREEMENT, report
