"""No completion can break a verifier: every task's reward path, driven by hypothesis with hostile strings
(huge numbers, deep nesting, megabytes, NUL bytes, lone surrogates, thousands of calls), returns a verdict,
never raises, and takes time linear in the completion's length."""

import contextlib
import json
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import TASKS, get_task
from verifiers import Verdict, check_function_calls

CALL = {"name": "f", "arguments": {"x": 1}}
# Pieces each task's parsers look for, to be repeated, nested and glued together.
FRAGMENTS = ["<answer>", "</answer>", "<tool_call>", "</tool_call>", "```", "```json\n", "```python\n", "####",
             "\\boxed{", "}", "[", "]", "{", "(", ")", '"', ":", ",", "-", ".", "e999", "1", "9" * 5000, "\x00",
             "\ud800", "\udfff", json.dumps(CALL), '{"name": "f", "arguments": "{\\"x\\": 1', "def f(x):\n    ",
             "return x\n", "assert ", "import os\n", "\n"]


def hostile(n_max=400_000):
    """Strings from the families that broke or stalled a verifier (or could): each a family and a size."""
    size = st.integers(1, n_max)
    huge = st.integers(4_000, 200_000).map(lambda n: "9" * n)
    return st.one_of(
        st.text(st.characters(exclude_categories=()), max_size=300),            # surrogates and NULs included
        st.lists(st.sampled_from(FRAGMENTS), max_size=200).map("".join),
        st.tuples(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=4).map("".join), size)
          .map(lambda t: t[0] * (t[1] // len(t[0]) + 1)),                            # one piece, up to megabytes
        size.map(lambda n: "[" * n + "]" * n), size.map(lambda n: "{" * n), size.map(lambda n: "(" * n),
        huge.map(lambda d: json.dumps([{"name": "f", "arguments": {"x": 0}}]).replace("0", d)),
        huge.map(lambda d: f"<answer> {d} + 1 </answer>"), huge.map(lambda d: f"#### {d}.5"),
        huge.map(lambda d: f"```python\ndef f(x):\n    return {d}\n```"),
        st.integers(1, 5_000).map(lambda n: "<tool_call>" + json.dumps(CALL) + "</tool_call>" * n),
        st.integers(1, 5_000).map(lambda n: json.dumps([CALL] * n)),
        st.just("a" * (1 << 21)), st.just("\x00" * (1 << 20)), st.just("\ud800" * (1 << 18)))


def examples_of(name):
    return get_task(name).load("train", size=2, seed=0)


def budget(completion) -> float:
    # Seconds a verdict may take: linear in the length, with room for a slow, shared machine. A quadratic
    # parser takes minutes on 400 KB; the sandboxed code check pays a process start.
    return 2.0 + 4.0 * len(completion) / 1e6


TEXT_TASKS = [t for t in TASKS if t != "mbpp"]


@contextlib.contextmanager
def within(seconds):
    """Fails the test (TimeoutError) when the block runs past `seconds`, instead of waiting out a quadratic
    verifier for minutes."""
    def expired(*_):
        raise TimeoutError(f"took more than {seconds:.1f} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(completion=hostile())
def test_no_completion_breaks_a_text_verifier(completion):
    for name in TEXT_TASKS:
        task, examples = get_task(name), EXAMPLES[name]
        with within(budget(completion) * len(examples)):
            verdicts = task.check_batch([completion] * len(examples), examples)
        assert all(isinstance(v, Verdict) and type(v.ok) is bool and isinstance(v.feedback, str) for v in verdicts)
        assert not any(v.ok for v in verdicts), (name, completion[:80])


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(completion=hostile(n_max=100_000))
def test_no_completion_breaks_the_code_verifier(completion):
    examples = EXAMPLES["mbpp"]
    with within(10.0 + budget(completion) * len(examples)):
        verdicts = get_task("mbpp").check_batch([completion] * len(examples), examples)
    assert all(isinstance(v, Verdict) and type(v.ok) is bool and isinstance(v.feedback, str) for v in verdicts)
    assert not any(v.ok for v in verdicts)


EXAMPLES = {name: examples_of(name) for name in TASKS}


@pytest.mark.parametrize("completion", [
    json.dumps([{"name": "f", "arguments": {"x": 0}}]).replace("0", "9" * 100_000),   # ValueError before
    "[" * 200_000 + "]" * 200_000,                                                  # 8-30 s before
    "<tool_call>" * 40_000,                                                         # minutes before
])
def test_the_hostile_completions_once_reported(completion):
    with within(2.0):
        verdict = check_function_calls(completion, [CALL])
    assert verdict == Verdict(False, "no JSON list of calls found")


def test_a_call_after_many_brackets_of_prose_is_still_found_within_the_cap():
    # The cap on JSON starts: a call after a few broken brackets is read; after hundreds it is not.
    assert check_function_calls("[ oops { no " * 10 + json.dumps([CALL]), [CALL]).ok
    assert not check_function_calls("[ oops { no " * 100 + json.dumps([CALL]), [CALL]).ok
