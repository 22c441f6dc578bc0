"""Binary verifiers with feedback: the reward of RRR and the environment feedback of Re-ReST.

Each checker takes a raw model completion (any string at all) and returns Verdict(ok, feedback), where
feedback is one short, specific sentence a reflector can act on. No checker raises on a completion. A
program the sandbox could not run for reasons outside it (no process, bwrap refusing) gets
Verdict(False, "not judged: ...", infra=True): no reward either way (see stop_if_unjudged).

Countdown: the last <answer>, in exact rational arithmetic, by its own parser. Function calls: xLAM/APIGen
calls, or BFCL possible answers by BFCL's rules. Code (MBPP): the asserts, visible then hidden, run in
sandbox.py's fresh, isolated processes, the parent deciding each test. GSM8K: the final number.
"""

import json
import operator
import re
from collections import Counter
from fractions import Fraction
from typing import NamedTuple

from bfcl import bfcl_problem, no_call
from runs import InfrastructureError, short
from sandbox import run_batch


class Verdict(NamedTuple):
    ok: bool
    feedback: str
    base: bool | None = None    # with hidden tests: whether the visible ones alone pass (EvalPlus's "base")
    infra: bool = False         # not judged: the machinery failed, not the program (ok is then False)
    shown: str | None = None    # what a prompt may show of feedback: with hidden tests, the visible part

    def feedback_to_show(self) -> str:
        """The feedback a model may be shown (rrr.py's --reflection-feedback): all of it, except that
        hidden tests are never described, not even by their count."""
        return self.feedback if self.shown is None else self.shown


NOT_RUN = "<not run: "           # code_outputs_batch's value where the sandbox could not run the program
MAX_NOT_JUDGED = 0.1           # the share of a batch that may go unjudged before a run stops


def stop_if_unjudged(verdicts: list[Verdict]) -> list[Verdict]:
    """The verdicts, unless more than MAX_NOT_JUDGED of them are infrastructure errors."""
    bad = [v for v in verdicts if v.infra]
    if len(bad) > MAX_NOT_JUDGED * len(verdicts):
        raise InfrastructureError(f"{len(bad)} of {len(verdicts)} programs of a batch could not be run (more "
                                  f"than {MAX_NOT_JUDGED:.0%}), for example: {bad[0].feedback}")
    return verdicts


# --- Countdown ---------------------------------------------------------------------------------------

MAX_EXPRESSION, MAX_DEPTH, MAX_DIGITS = 200, 20, 6
_OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def between(text: str, opening: str, closing: str) -> list[str]:
    """What each `opening`...`closing` pair encloses, pairs taken left to right, each opening with the
    first closing after it (as a non-greedy regex would), in time linear in the text: a regex retries
    every unclosed opening to the end, which is quadratic in a completion of thousands of them."""
    found, start = [], 0
    while (i := text.find(opening, start)) >= 0 and (j := text.find(closing, i + len(opening))) >= 0:
        found.append(text[i + len(opening):j])
        start = j + len(closing)
    return found


def check_countdown(completion: str, nums, target) -> Verdict:
    answers = between(completion, "<answer>", "</answer>")
    if not answers:
        return Verdict(False, "no <answer>...</answer> tag")
    expression = answers[-1].strip()
    if not expression:
        return Verdict(False, "the answer is empty")
    if len(expression) > MAX_EXPRESSION:
        return Verdict(False, f"the answer is longer than {MAX_EXPRESSION} characters")
    try:
        value, used = _Parser(_tokens(expression)).parse()
    except ValueError as e:
        return Verdict(False, str(e))
    given, got = Counter(nums), Counter(used)
    for n in sorted(got):
        if n not in given:
            return Verdict(False, f"uses {n}, which is not one of the numbers {list(nums)}")
        if got[n] > given[n]:
            times = {2: "twice", 3: "three times"}.get(got[n], f"{got[n]} times")
            given_times = f", but it is given {given[n]} times" if given[n] > 1 else ""
            return Verdict(False, f"uses {n} {times}{given_times}")
    missing = sorted((given - got).elements())
    if missing:
        return Verdict(False, f"does not use {', '.join(map(str, missing))}")
    if value != target:
        shown = str(value) if value.denominator == 1 else f"{value} (about {float(value):.4g})"
        return Verdict(False, f"equals {shown}, not {target}")
    return Verdict(True, f"correct: equals {target}")


def _tokens(text: str) -> list:
    tokens = []
    for number, other in re.findall(r"([0-9]+)|(\S)", text):     # \S: what str.isspace() is not
        if len(number) > MAX_DIGITS:
            raise ValueError(f"the number {number[:12]}... is too long")
        if number:
            tokens.append(int(number))
        elif other in "+-*/()":
            tokens.append(other)
        else:
            raise ValueError(f"unexpected character {other!r}: "
                             "only numbers, + - * / and parentheses are allowed")
    return tokens


class _Parser:
    """expression := term (('+' | '-') term)*; term := factor (('*' | '/') factor)*;
    factor := integer | '(' expression ')'. Binary operators only: a leading '-' is an error."""

    def __init__(self, tokens):
        self.tokens, self.i, self.used = tokens, 0, []

    def parse(self):
        value = self.expression(0)
        if self.i != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.i]!r} after a complete expression")
        return value, self.used

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def expression(self, depth):
        return self.left_to_right(depth, ("+", "-"), self.term)

    def term(self, depth):
        return self.left_to_right(depth, ("*", "/"), self.factor)

    def left_to_right(self, depth, ops, operand):
        value = operand(depth)
        while self.peek() in ops:
            op = self.tokens[self.i]
            self.i += 1
            right = operand(depth)
            if op == "/" and right == 0:
                raise ValueError("division by zero")
            value = _OPERATIONS[op](value, right)
        return value

    def factor(self, depth):
        token = self.peek()
        if token is None:
            raise ValueError("the expression ends too early")
        self.i += 1
        if isinstance(token, int):
            self.used.append(token)
            return Fraction(token)
        if token == "(":
            if depth >= MAX_DEPTH:
                raise ValueError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expression(depth + 1)
            if self.peek() != ")":
                raise ValueError("a '(' is never closed")
            self.i += 1
            return value
        unary = " (no unary minus)" if token == "-" else ""
        raise ValueError(f"expected a number or '(', got {token!r}{unary}")


# --- function calls ----------------------------------------------------------------------------------

JSON_STARTS = 64       # brackets _first_json tries as the start of a JSON value


def parse_calls(completion: str):
    """The calls in a completion as a list of {"name", "arguments"} dicts, or None if none can be read.
    Looks in <tool_call> tags first, then the last ```json fence, then the first JSON list or object."""
    tagged = between(completion, "<tool_call>", "</tool_call>")
    if tagged:
        calls = []
        for block in tagged:
            found = _first_json(block)
            if found is None:
                return None
            calls += found if isinstance(found, list) else [found]
        return _normalise(calls)
    fences = between(completion, "```", "```")       # a "json" after the opening is skipped with the text
    found = _first_json(fences[-1]) if fences else None
    if found is None:
        found = _first_json(completion)
    if found is None:
        return None
    return _normalise(found if isinstance(found, list) else [found])


def _first_json(text: str):
    """The first JSON list or object that starts at one of the first JSON_STARTS brackets, else None. The
    cap keeps the cost linear: each start costs up to a pass over the text (400 KB of nested brackets
    would otherwise take minutes). JSON the decoder refuses (an integer of more than 4,300 digits: Python's
    limit; nesting past the recursion limit) is no JSON."""
    decoder = json.JSONDecoder()
    for n, m in enumerate(re.finditer(r"[\[{]", text)):
        if n == JSON_STARTS:
            break
        try:
            return decoder.raw_decode(text, m.start())[0]
        except (ValueError, RecursionError):       # json.JSONDecodeError is a ValueError
            continue
    return None


def _normalise(calls):
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        args = call.get("arguments", call.get("parameters", {}))
        if isinstance(args, str):          # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        out.append({"name": call["name"], "arguments": args})
    return out


def format_calls(calls: list[dict]) -> str:
    """A list of calls written as the completion the task prompt asks for. BFCL possible answers
    become calls with the first acceptable value of each parameter (optional ones left out)."""
    if calls and not _is_xlam(calls):
        calls = [{"name": name, "arguments": {p: _first(v) for p, v in params.items() if v and v[0] != ""}}
                 for entry in calls for name, params in entry.items()]
    return json.dumps(calls, ensure_ascii=False)


def _first(acceptable):
    # BFCL writes a dict argument as a dict of acceptable-value lists, also inside lists.
    def pick(value):
        if isinstance(value, dict):
            return {k: _first(v) for k, v in value.items() if not (isinstance(v, list) and v and v[0] == "")}
        return [pick(v) for v in value] if isinstance(value, list) else value
    return pick(acceptable[0] if isinstance(acceptable, list) and acceptable else acceptable)


def _is_xlam(answers) -> bool:
    # xLAM rows are {"name", "arguments"}; BFCL rows are {function name: {parameter: [values]}}.
    return all(isinstance(a, dict) and isinstance(a.get("name"), str) and "arguments" in a for a in answers)


def check_function_calls(completion: str, answers: list, tools: list | None = None) -> Verdict:
    """xLAM/APIGen answers: the calls must equal the expected ones, one to one in any order. BFCL possible
    answers: BFCL's rules (bfcl.py), `tools` (the row's function docs) giving the declared types."""
    calls = parse_calls(completion)
    if calls is None:
        return Verdict(False, "no JSON list of calls found")
    xlam = _is_xlam(answers)
    if xlam:
        answers = _normalise(answers) or []
    if len(calls) != len(answers):
        return Verdict(False, f"expected {len(answers)} call{'s' * (len(answers) != 1)}, got {len(calls)}")
    if not xlam:
        problem = bfcl_problem(calls, answers, tools)
        return Verdict(problem is None, problem or "correct calls")
    if _perfect_matching(len(answers), lambda i, j: _xlam_call_problem(calls[j], answers[i]) is None):
        return Verdict(True, "correct calls")
    # Explain the first expected call that no call satisfies, against the closest call of its name.
    for answer in answers:
        problems = [_xlam_call_problem(c, answer) for c in calls if c["name"] == answer["name"]]
        if not problems:
            return Verdict(False, no_call(calls, [a["name"] for a in answers], answer["name"]))
        if None not in problems:
            return Verdict(False, min(problems, key=len))
    return Verdict(False, "the calls do not match the expected ones one to one")


def _perfect_matching(n, fits) -> bool:
    """Whether expected calls 0..n-1 can be paired one to one with the n calls (augmenting paths)."""
    owner = [None] * n

    def place(i, seen):
        for j in range(n):
            if j not in seen and fits(i, j):
                seen.add(j)
                if owner[j] is None or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False
    return all(place(i, set()) for i in range(n))


def _xlam_call_problem(call, answer) -> str | None:
    """None when the call equals the expected one; else what differs."""
    name, want, got = answer["name"], answer["arguments"], call["arguments"]
    if call["name"] != name:
        return f"called {call['name']}, expected {name}"
    for key in want:
        if key not in got:
            return f"missing argument {key!r} in {name}"
        if not _same(got[key], want[key]):
            return f"argument {key!r} of {name} is {short(got[key], 60)}, expected {short(want[key], 60)}"
    extra = sorted(set(got) - set(want))
    return f"unexpected argument {extra[0]!r} in {name}" if extra else None


def _same(a, b) -> bool:
    """Equal as JSON values: numbers by value across int and float (never bool), strings exactly."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# --- math (GSM8K) ------------------------------------------------------------------------------------

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def _to_number(text: str) -> Fraction | None:
    text = text.replace(",", "").rstrip(".")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def check_math(completion: str, answer) -> Verdict:
    expected = (_to_number(answer.split("####")[-1].strip()) if isinstance(answer, str)
                else Fraction(str(answer)))
    if expected is None:
        raise ValueError(f"reference answer {answer!r} has no number")
    # The first number after the last ####, else the last in the last \boxed{}, else the last in the text.
    after = completion.split("####")[-1] if "####" in completion else ""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    found = (re.findall(_NUMBER, after)[:1] or re.findall(_NUMBER, boxed[-1] if boxed else "")
             or re.findall(_NUMBER, completion))
    got = _to_number(found[-1]) if found else None
    if got is None:
        return Verdict(False, "no number found")
    if got == expected:
        return Verdict(True, f"correct: {short(str(expected))}")
    return Verdict(False, f"answer {short(_shown(got))}, expected {short(_shown(expected))}")


def _shown(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x)
    try:
        return f"{float(x):g}"
    except OverflowError:        # a decimal of thousands of digits
        return f"{x.numerator // x.denominator}..."


# --- code (MBPP) -------------------------------------------------------------------------------------

def check_code(completion: str, tests, setup: str = "", hidden=None, timeout: float = 5.0) -> Verdict:
    """Passes only when the program and every assert in `tests` and `hidden` ran in the sandbox and passed."""
    return check_code_batch([(completion, tests, setup, hidden)], workers=1, timeout=timeout)[0]


def check_code_batch(items, workers: int | None = None, timeout: float = 5.0) -> list[Verdict]:
    """items: (completion, tests, setup) or (completion, tests, setup, hidden tests). Verdicts in order;
    `workers` programs at a time (default: one per CPU core). Every process is gone when this returns.
    Hidden tests run in the same process after the visible ones; the feedback shows only the visible ones
    and, for the hidden ones, how many failed."""
    items = [(c, list(t), s, list(h[0] or ()) if h else []) for c, t, s, *h in items]
    runs = run_batch([(c, t + h, s) for c, t, s, h in items], workers, timeout, "check")
    return [_with_hidden(t, h, run, timeout) for (_, t, _, h), (_, run) in zip(items, runs)]


def _with_hidden(tests, hidden, run: dict, timeout: float) -> Verdict:
    if not hidden or run["infra"]:
        return _feedback(tests, run, timeout)
    n, results = len(tests), run["results"]
    visible = _feedback(tests, dict(run, results=results[:n], done=run["done"] or len(results) > n), timeout)
    failed = len(hidden) - sum(ok for ok, _ in results[n:])     # a hidden test never answered failed
    if not failed:
        return visible._replace(base=visible.ok)
    note = f"{failed} of {len(hidden)} hidden tests failed (their inputs are not shown)"
    return Verdict(False, f"{visible.feedback}\n{note}", base=visible.ok, shown=visible.feedback)


def _feedback(tests, run: dict, timeout: float) -> Verdict:
    results = run["results"]
    if run["infra"]:
        return Verdict(False, f"not judged: {run['infra']}", infra=True)
    if run["done"] and run["failure"] and not any(ok for ok, _ in results):
        return Verdict(False, run["failure"] if not tests else f"{run['failure']}; no test could run")
    if run["done"] and results and all(ok for ok, _ in results) and len(results) == len(tests):
        return Verdict(True, "Tests passed:\n" + "\n".join(tests))
    if not run["done"] and not results:
        stopped = "the program stopped before the tests ran (exiting, a crash, or the memory limit)"
        return Verdict(False, f"timed out after {timeout:g} s" if run["timed_out"] else stopped)
    passed = [t for t, (ok, _) in zip(tests, results) if ok]
    failed = [f"{t}  # output: {short(out)}" for t, (ok, out) in zip(tests, results) if not ok]
    missing = tests[len(results):]
    if missing:
        label = "TIMEOUT" if run["timed_out"] else "the program stopped here"
        failed += [f"{missing[0]}  # output: {label}"] + [f"{t}  # output: not run" for t in missing[1:]]
    return Verdict(False, "\n".join(["Tests passed:"] + (passed or ["(none)"]) + ["Tests failed:"] + failed))


def code_outputs_batch(items, workers: int | None = None, timeout: float = 5.0) -> list[list[str]]:
    """For each (completion, tests, setup): the repr of what each test's left-hand side evaluates to
    (the program's output on that test's input), never looking at the expected value; "<Error: ...>"
    or "<TIMEOUT>" where it has none, NOT_RUN... where the sandbox could not run it. Re-ReST's
    self-consistency votes with these."""
    out = []
    for tests, run in run_batch(items, workers, timeout, "outputs"):
        values = [v if ok else f"<{v}>" for ok, v in run["results"]]
        if run["infra"]:
            values = [f"{NOT_RUN}{run['infra']}>"] * len(tests)
        elif run["done"] and run["failure"]:
            values = [f"<{run['failure']}>"] * len(tests)
        out.append(values + ["<TIMEOUT>" if run["timed_out"] else "<not run>"] * (len(tests) - len(values)))
    return out
