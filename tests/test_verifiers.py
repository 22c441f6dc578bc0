"""verifiers.py against the real data sets' reference answers, hand-made cases, reward hacks and fuzzing."""

import ast
import json
import os
import random
import resource
import statistics
import time
from pathlib import Path

import pytest

from data import get_task
from data.mbpp_hidden import HIDDEN_PER_PROBLEM
from tiny import shared_data_dir
from verifiers import (check_code, check_code_batch, check_countdown, check_function_calls, check_math,
                       code_outputs_batch, format_calls, parse_calls)


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- Countdown ---------------------------------------------------------------------------------------

def test_countdown_reference_solutions_pass_and_a_changed_number_fails():
    rows = []
    for split in ("train", "test"):
        rows += jsonl(shared_data_dir() / "countdown" / f"countdown_3to4_{split}.jsonl")
    assert len(rows) == 11264
    for r in rows:
        solution = r["reference_solution"]
        assert check_countdown(f"<think>...</think> <answer>{solution}</answer>", r["nums"], r["target"]).ok, r
        first = next(n for n in r["nums"] if str(n) in solution)
        changed = solution.replace(str(first), str(first + 1), 1)
        assert not check_countdown(f"<answer>{changed}</answer>", r["nums"], r["target"]).ok, r


@pytest.mark.parametrize("answer, nums, target, ok, says", [
    ("(1 / 3) * 3 * 5", [1, 3, 3, 5], 5, True, "correct"),        # exact rationals, no float rounding
    ("10 / 4 * 8", [10, 4, 8], 20, True, "correct"),
    ("44 + 19 + 35", [44, 19, 35], 98, True, "correct"),
    ("44 + 44 + 35 - 19", [44, 19, 35], 104, False, "uses 44 twice"),
    ("44 + 19", [44, 19, 35], 63, False, "does not use 35"),
    ("44 + 19 + 36", [44, 19, 35], 99, False, "uses 36"),
    ("-44 + 19 + 35", [44, 19, 35], 10, False, "unary minus"),
    ("44 + 19 * 35", [44, 19, 35], 98, False, "equals 709, not 98"),
    ("35 / (44 - 44) + 19", [44, 44, 35, 19], 1, False, "division by zero"),
    ("44 ** 2", [44, 2], 1936, False, "expected a number"),
    ("4.5 * 2", [4, 5, 2], 9, False, "unexpected character '.'"),
])
def test_countdown_hand_cases(answer, nums, target, ok, says):
    verdict = check_countdown(f"<answer>{answer}</answer>", nums, target)
    assert verdict.ok == ok and says in verdict.feedback, verdict


def test_countdown_last_answer_wins_and_limits_give_verdicts():
    assert check_countdown("<answer>1 + 2</answer> no wait <answer>2 * 3</answer>", [2, 3], 6).ok
    assert not check_countdown("<answer>2 * 3</answer> no wait <answer>1 + 2</answer>", [2, 3], 6).ok
    assert "no <answer>" in check_countdown("the answer is 6", [2, 3], 6).feedback
    deep = "(" * 10_000 + "1" + ")" * 10_000
    assert not check_countdown(f"<answer>{deep}</answer>", [1], 1).ok
    huge = "+".join(["1"] * 500_000)
    assert not check_countdown(f"<answer>{huge}</answer>", [1], 1).ok
    assert "too long" in check_countdown("<answer>12345678901234567890 - 1</answer>", [1], 1).feedback


# --- MBPP code execution -----------------------------------------------------------------------------

def lookup_table_program(tests: list[str]) -> str:
    """The reward hack hidden tests exist for: a function that returns each visible assert's expected
    value for that assert's arguments, and knows nothing else."""
    table, name = {}, None
    for test in tests:
        expr = ast.parse(test).body[0].test
        if isinstance(expr, ast.Compare) and isinstance(expr.left, ast.Call) and isinstance(expr.left.func, ast.Name):
            try:
                args = tuple(ast.literal_eval(a) for a in expr.left.args)
            except ValueError:
                continue
            name = expr.left.func.id
            table[repr(args)] = ast.unparse(expr.comparators[0])
    entries = ", ".join(f"{k!r}: {v}" for k, v in table.items())
    return f"```python\ndef {name or 'f'}(*args):\n    return {{{entries}}}[repr(args)]\n```"


@pytest.mark.slow
def test_mbpp_hidden_tests_stop_hardcoding_and_keep_the_reference_programs():
    """Through the task's own reward path on all 974 problems: the reference programs pass (visible and
    hidden tests), stubs fail, and a lookup table of the visible asserts, which passes them, earns reward
    on at most 5% of the problems (those left without hidden tests)."""
    task = get_task("mbpp")
    examples = [ex for split in task.splits for ex in task.load(split, data_dir=shared_data_dir())]
    assert len(examples) == 974
    counts = [len(ex.reference["hidden"]) for ex in examples]
    assert statistics.median(counts) == HIDDEN_PER_PROBLEM and sum(c == 0 for c in counts) <= 0.05 * 974
    for ex in examples:       # never shown: not in the prompt
        assert not any(h.removeprefix("assert ") in ex.messages[-1]["content"] for h in ex.reference["hidden"])

    references = task.check_batch([f"```python\n{ex.reference['code']}\n```" for ex in examples], examples)
    failed = {ex.id: v.feedback for ex, v in zip(examples, references) if not v.ok}
    assert len(failed) <= 4, failed          # a reference slower than the 5 s limit on a slow CPU (task 123)

    hardcoded = task.check_batch([lookup_table_program(ex.reference["tests"]) for ex in examples], examples)
    assert sum(bool(v.base) for v in hardcoded) >= 900          # the hack passes the visible tests...
    rewarded = [ex.id for ex, v in zip(examples, hardcoded) if v.ok]
    assert len(rewarded) <= 0.05 * 974, rewarded                 # ...and the hidden ones stop it
    assert all(len(ex.reference["hidden"]) == 0 for ex, v in zip(examples, hardcoded) if v.ok)
    shown = next(v.feedback for v in hardcoded if v.base and not v.ok)
    assert "hidden tests failed" in shown and "Tests passed" in shown

    # Stubs: the same programs with every function's body replaced by `return None`.
    stubs = []
    for ex in examples:
        tree = ast.parse(ex.reference["code"])
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                node.body = [ast.Return(ast.Constant(None))]
        stubs.append(f"```python\n{ast.unparse(tree)}\n```")
    assert [ex.id for ex, v in zip(examples, task.check_batch(stubs, examples)) if v.ok] == []
    print(f"hidden tests per problem: median {statistics.median(counts)}, minimum {min(counts)}, "
          f"none for {sum(c == 0 for c in counts)} problems; references failing: {len(failed)}; "
          f"lookup tables passing the visible tests: {sum(bool(v.base) for v in hardcoded)}, rewarded: {len(rewarded)}")


def test_empty_body_fails_naming_the_assert_and_the_output():
    verdict = check_code("```python\ndef square(x):\n    pass\n```", ["assert square(3) == 9", "assert square(0) == 0"])
    assert not verdict.ok
    assert "assert square(3) == 9  # output: None" in verdict.feedback
    assert "Tests failed" in verdict.feedback


def test_feedback_reports_passed_and_failed_asserts_with_actual_values():
    verdict = check_code("def f(x):\n    return x * 2", ["assert f(2) == 4", "assert f(3) == 9", "assert g(1) == 1"])
    assert not verdict.ok
    passed, failed = verdict.feedback.split("Tests failed:")
    assert "assert f(2) == 4" in passed
    assert "assert f(3) == 9  # output: 6" in failed
    assert "NameError" in failed


@pytest.mark.parametrize("program", [
    "exit(0)",
    "quit()",
    "import sys\nsys.exit(0)",
    "raise SystemExit",
    "import os\nos._exit(0)",
    "import os\nos.stat.__self__._exit(0)",
    "def f(x):\n    raise SystemExit(0)",
    "print('Tests passed: all')\nprint(\"('done', 'x', [(True, '')], None)\")\nimport os\nos.stat.__self__._exit(0)",
    "import os\nfor fd in range(3, 20):\n    try:\n        os.write(fd, b\"('done', 'x', [(True, '')], None)\\n\")\n    except OSError:\n        pass\nos.stat.__self__._exit(0)",
    "class Yes:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Yes()",
    "class Truthy:\n    def __eq__(self, other):\n        return 1\ndef f(x):\n    return Truthy()",
    "class Nine(int):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Nine(0)",
    "class L(list):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return [L()]",
    "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\ndef f(x):\n    return 0",
    "import builtins\nbuiltins.isinstance = lambda *a: True\nbuiltins.type = lambda *a: int\ndef f(x):\n    return 'x'",
])
def test_reward_hacks_fail(program):
    verdict = check_code(program, ["assert f(3) == 9", "assert f(4) == [16]"], timeout=5)
    assert not verdict.ok, verdict


def sandbox_processes() -> int:
    """Sandbox processes (bwrap's and the child's) that this test process started and that still exist,
    known by their command line: sandbox_child.py's text, then the report descriptor and our pid."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            count += any(b"What runs inside the sandbox's process" in a for a in args) and str(os.getpid()).encode() in args
    return count


@pytest.mark.parametrize("program, why", [
    ("def f(x):\n    while True:\n        pass", "timed out"),
    ("import time\ndef f(x):\n    time.sleep(60)", "timed out"),
    ("import os\nwhile True:\n    os.stat.__self__.fork()", ""),
    ("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nimport time\ntime.sleep(60)", ""),
    ("x = bytearray(100 * 2**30)", "MemoryError"),
    ("x = [0] * (100 * 2**30)", "MemoryError"),
])
def test_runaway_programs_fail_in_time_and_leave_nothing(program, why):
    start = time.monotonic()
    verdict = check_code(program, ["assert f(3) == 9"], timeout=2)
    assert not verdict.ok and why in verdict.feedback, verdict
    assert time.monotonic() - start < 2 + 2
    assert sandbox_processes() == 0


def test_output_flood_is_discarded_and_the_asserts_decide():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    flood = "import sys\nfor _ in range(1000):\n    sys.stdout.write('x' * 1_000_000)\n"
    start = time.monotonic()
    passing = check_code(flood + "def f(x):\n    return x * x", ["assert f(3) == 9"], timeout=10)
    failing = check_code(flood + "def f(x):\n    return x", ["assert f(3) == 9"], timeout=10)
    assert passing.ok and not failing.ok
    assert time.monotonic() - start < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000     # KB: the parent kept nothing


def test_destructive_calls_leave_outside_files_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    attempts = [f"import os\nos.remove({str(victim)!r})", f"import os\nos.unlink({str(victim)!r})",
                f"import shutil\nshutil.rmtree({str(tmp_path)!r})", f"open({str(victim)!r}, 'w').write('gone')",
                f"import os\nos.rename({str(victim)!r}, 'x')", "import os\nos.system('true')",
                "import subprocess\nsubprocess.run(['true'])"]
    for program in attempts:
        check_code(program + "\ndef f(x):\n    return x * x", ["assert f(3) == 9"])
        assert victim.read_text() == "keep", program
    # Inside its own folder a program may write and read back.
    assert check_code("open('mine.txt', 'w').write('ok')\ndef f():\n    return open('mine.txt').read()",
                      ["assert f() == 'ok'"]).ok


def test_extraction_of_the_program():
    tests = ["assert f(2) == 4"]
    assert check_code("Here:\n```python\ndef f(x):\n    return x * 2\n```\nDone.", tests).ok
    assert check_code("```python\ndef f(x):\n    return 0\n```\nBetter:\n```python\ndef f(x):\n    return 4\n```", tests).ok
    assert check_code("[PYTHON]\ndef f(x):\n    return x + 2\n[/PYTHON]", tests).ok
    assert check_code("[BEGIN]\ndef f(x):\n    return x ** 2\n[DONE]", tests).ok
    assert check_code("def f(x):\n    return x * x", tests).ok
    assert check_code("```python\ndef f(x):\n    return x * 2", tests).ok          # a fence cut by the length limit
    assert "no test could run" in check_code("", tests).feedback or not check_code("", tests).ok


def test_setup_code_runs_after_the_program_and_batches_keep_order():
    items = [(f"def f(x):\n    return x + {k}", [f"assert f(base) == {10 + k}"], "base = 10") for k in range(6)]
    items[3] = ("def f(x):\n    return 0", items[3][1], "base = 10")
    verdicts = check_code_batch(items, workers=2)
    assert [v.ok for v in verdicts] == [True, True, True, False, True, True]


def test_code_outputs_do_not_need_the_expected_values():
    outputs = code_outputs_batch([("def f(x):\n    return x + 1", ["assert f(1) == 5", "assert g(2) == 3", "assert f(0)"], ""),
                                  ("def f(x):\n    while True:\n        pass", ["assert f(1) == 2"], "")], timeout=1)
    assert outputs[0][0] == "2" and "NameError" in outputs[0][1] and outputs[0][2] == "1"
    assert outputs[1] == ["<TIMEOUT>"]


# --- function calls ----------------------------------------------------------------------------------

def test_bfcl_ground_truth_passes_and_a_changed_value_fails():
    """Through the loader, which leaves out the rows that no call can pass under BFCL's rules."""
    from data import get_task
    task = get_task("function_calling")
    examples = [ex for split in ("train", "test") for ex in task.load(split, data_dir=shared_data_dir())
                if ex.id.startswith("bfcl-")]
    for ex in examples:
        truth = ex.reference["answers"]
        calls = []
        for entry in truth:
            (name, params), = entry.items()
            calls.append({"name": name, "arguments": {p: first_value(v) for p, v in params.items()
                                                      if not (v and v[0] == "")}})
        verdict = check_function_calls(json.dumps(calls), truth)
        assert verdict.ok, (ex.id, verdict)
        changed = next(((c, p) for c in calls for p, v in c["arguments"].items()
                        if isinstance(v, (int, float, str)) and not isinstance(v, bool)), None)
        if changed:
            call, p = changed
            value = call["arguments"][p]
            call["arguments"][p] = value + 1000 if not isinstance(value, str) else "zzz unrelated"
            assert not check_function_calls(json.dumps(calls), truth).ok, ex.id
    assert len(examples) > 2000


def first_value(acceptable):
    """The first acceptable value, choosing recursively inside the dicts of acceptable values that BFCL
    uses for dict arguments (also inside lists)."""
    return resolve(acceptable[0] if isinstance(acceptable, list) else acceptable)


def resolve(value):
    if isinstance(value, dict):
        return {k: first_value(v) for k, v in value.items() if not (isinstance(v, list) and v and v[0] == "")}
    if isinstance(value, list):
        return [resolve(v) for v in value]
    return value


def test_apibank_gold_answers_pass():
    for path in sorted((shared_data_dir() / "function_calling" / "apibank_hammer").glob("*.json")):
        for row in json.loads(path.read_text()):
            assert check_function_calls(format_calls(row["answers"]), row["answers"]).ok, row["answers"]


WEATHER = [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]


@pytest.mark.parametrize("completion, ok, says", [
    ('[{"name": "get_weather", "arguments": {"days": 2, "city": "Paris"}}]', True, "correct"),
    ('[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2.0}}]', True, "correct"),
    ('[{"name": "get_weather", "arguments": {"city": "Paris", "days": "2"}}]', False, "argument 'days'"),
    ('[{"name": "get_weather", "arguments": {"city": "Paris"}}]', False, "missing argument 'days' in get_weather"),
    ('[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "unit": "C"}}]', False, "unexpected argument 'unit'"),
    ('[{"name": "get_wether", "arguments": {"city": "Paris", "days": 2}}]', False, "unknown function 'get_wether'"),
    ('[]', False, "expected 1 call, got 0"),
    ('```json\n[{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]\n```', True, "correct"),
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 2}"}</tool_call>', True, "correct"),
    ('I think [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}] works', True, "correct"),
    ("no calls here", False, "no JSON list"),
])
def test_xlam_hand_cases(completion, ok, says):
    verdict = check_function_calls(completion, WEATHER)
    assert verdict.ok == ok and says in verdict.feedback, verdict


def test_parallel_calls_match_in_any_order_and_count():
    answers = [{"name": "a", "arguments": {"x": 1}}, {"name": "a", "arguments": {"x": 2}}]
    assert check_function_calls('[{"name": "a", "arguments": {"x": 2}}, {"name": "a", "arguments": {"x": 1}}]', answers).ok
    assert not check_function_calls('[{"name": "a", "arguments": {"x": 1}}, {"name": "a", "arguments": {"x": 1}}]', answers).ok
    assert not check_function_calls('[{"name": "a", "arguments": {"x": 1}}]', answers).ok
    bfcl = [{"f": {"city": ["Paris", "paris, france"], "unit": ["", "celsius"]}}]
    assert check_function_calls('[{"name": "f", "arguments": {"city": "PARIS"}}]', bfcl).ok
    assert check_function_calls('[{"name": "f", "arguments": {"city": "Paris, France", "unit": "celsius"}}]', bfcl).ok
    assert not check_function_calls('[{"name": "f", "arguments": {"city": "Lyon"}}]', bfcl).ok
    assert parse_calls('[{"name": "a", "arguments": {"x": 1}}]') == [{"name": "a", "arguments": {"x": 1}}]


# --- math --------------------------------------------------------------------------------------------

def test_gsm8k_answers_pass_and_off_by_one_fails():
    rows = jsonl(shared_data_dir() / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    for r in rows:
        final = r["answer"].split("####")[-1].strip().replace(",", "")
        assert check_math(f"Let me think. The answer is {final}.", r["answer"]).ok, r["answer"]
        wrong = str(int(float(final)) + 1)
        assert not check_math(f"The answer is {wrong}.", r["answer"]).ok


@pytest.mark.parametrize("completion, answer, ok", [
    ("... so 1,234 in all.\n#### 1,234", "#### 1234", True),
    ("The total is \\boxed{18}. Also 3 apples.", 18, True),
    ("It drops to -5 degrees", "#### -5", True),
    ("She pays 2.50 dollars", "#### 2.5", True),
    ("18.00", 18, True),
    ("#### 17", "text\n#### 18", False),
    ("no numbers at all", 3, False),
])
def test_math_hand_cases(completion, answer, ok):
    assert check_math(completion, answer).ok == ok


# --- fuzzing: no verifier raises on any completion ---------------------------------------------------

def random_text(rng):
    pieces = ["<answer>", "</answer>", "(", ")", "+", "-", "*", "/", "[", "]", "{", "}", '"name"', ":", ",",
              '"arguments"', "<tool_call>", "</tool_call>", "```", "```json", "####", "\\boxed{", "0", "7", "99",
              "1e309", "null", "true", " ", "\n", "é", "\x00", "∞", "-.5", "1,000"]
    out = []
    for _ in range(rng.randint(0, 40)):
        out.append(rng.choice(pieces) if rng.random() < 0.7 else chr(rng.randint(0, 0x2FFF)))
    return "".join(out)


def test_fuzzing_never_raises():
    rng = random.Random(0)
    answers_xlam = [{"name": "f", "arguments": {"x": 1}}]
    answers_bfcl = [{"f": {"x": [1, ""], "y": [{"a": ["b"]}]}}]
    for _ in range(2000):
        text = random_text(rng)
        check_countdown(text, [1, 7, 99], 24)
        check_function_calls(text, answers_xlam)
        check_function_calls(text, answers_bfcl)
        check_math(text, "#### 7")
    texts = [random_text(rng) for _ in range(50)]
    verdicts = check_code_batch([(t, ["assert f(1) == 1"], "") for t in texts], timeout=2)
    assert len(verdicts) == 50 and not any(v.ok for v in verdicts)
