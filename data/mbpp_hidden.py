"""Hidden tests for MBPP: more asserts per problem, never shown to the model, so that a program which only
special-cases the visible asserts' inputs earns no reward.

MBPP's prompt lists its asserts with their expected values, so a lookup table from the shown inputs to the
shown outputs passed them all. EvalPlus's MBPP+ closes the hole with extra tests made from the reference
solution by type-aware mutation of the inputs; this is that method (its data cannot be downloaded here):
  1. mutated_calls       for each visible `assert f(ARGS) == EXPECTED` with literal ARGS, calls with one
                         argument changed by its type (numbers nudged, sequences shortened, lengthened,
                         reordered, an element changed, a dict key dropped)
  2. make_hidden_tests   the reference solution's value on each call, run twice in the sandbox
  3. hidden_asserts      `assert f(ARGS) == VALUE` (math.isclose for a float) where the value was the same
                         plain literal on both runs, at most HIDDEN_PER_PROBLEM, none a visible test's call
Deterministic (a seed per problem), made once per data file (the offline sample too) and cached under
$RRR_CACHE/mbpp-hidden, keyed on the file's hash and GENERATOR_VERSION.
"""

import ast
import hashlib
import json
import math
import os
import random
import tempfile
from pathlib import Path

from tqdm import tqdm

from runs import InfrastructureError, cache_root
from verifiers import NOT_RUN, code_outputs_batch

HIDDEN_PER_PROBLEM = 10
GENERATOR_VERSION = 1            # part of the cache key: bump it when the mutations change
MAX_VALUE_REPR = 199             # characters of an expected value: the sandbox cuts a repr at 200, so a
                                 # longer one may be cut (a cut integer still reads back); it is dropped
MAX_INPUT_REPR = 2000            # characters of a hidden test's call


def visible_calls(tests: list[str]) -> list[tuple[str, list]]:
    """(function name, literal arguments) of each `assert name(...) == literal` among `tests`."""
    calls = []
    for test in tests:
        try:
            node = ast.parse(test).body[0]
            expr = node.test if isinstance(node, ast.Assert) else None
            call = expr.left if isinstance(expr, ast.Compare) else None
            if (isinstance(call, ast.Call) and len(expr.ops) == 1 and isinstance(expr.ops[0], ast.Eq)
                    and isinstance(call.func, ast.Name) and not call.keywords):
                calls.append((call.func.id, [ast.literal_eval(a) for a in call.args]))
        except (SyntaxError, IndexError, ValueError, TypeError):      # not an assert on a call of literals
            pass
    return calls


def mutations(value, rng: random.Random) -> list:
    """Values of the same type near `value` (EvalPlus-style type-aware mutation)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2, -value, value + rng.randint(2, 10)]
    if isinstance(value, float):
        return [value * 1.5, value + 0.5, -value]
    if isinstance(value, str):
        if not value:
            return ["a"]
        i = rng.randrange(len(value))
        return [value[:-1], value[1:], value + value[-1], value[::-1],
                value[:i] + value[i] * 2 + value[i + 1:]]
    if isinstance(value, (list, tuple)):
        items, out = list(value), []
        if items:
            i = rng.randrange(len(items))
            out = [items[:-1], items[1:], items[::-1], items + items[:1]]
            out += [items[:i] + [m] + items[i + 1:] for m in mutations(items[i], rng)[:2]]
        try:
            out.append(sorted(items))
        except TypeError:
            pass
        return [type(value)(x) for x in out]
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value, key=repr))
        return ([{k: v for k, v in value.items() if k != key}]
                + [{**value, key: m} for m in mutations(value[key], rng)[:2]])
    if isinstance(value, (set, frozenset)) and value:
        return [type(value)(sorted(value, key=repr)[1:])]
    return []


def mutated_calls(tests: list[str], seed: str) -> list[str]:
    """Calls (as source text) with one argument of a visible call mutated, in a seeded order, without
    duplicates and without the visible calls themselves."""
    rng = random.Random(seed)
    visible = visible_calls(tests)
    seen = {f"{name}({', '.join(map(repr, args))})" for name, args in visible}
    calls = []
    for name, args in visible:
        for i, arg in enumerate(args):
            for m in mutations(arg, rng):
                call = f"{name}({', '.join(repr(a) for a in args[:i] + [m] + args[i + 1:])})"
                if call not in seen and len(call) <= MAX_INPUT_REPR:
                    seen.add(call)
                    calls.append(call)
    rng.shuffle(calls)
    return calls


def _has_float(value) -> bool:
    if isinstance(value, dict):
        return any(_has_float(k) or _has_float(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(map(_has_float, value))
    return isinstance(value, float)


def hidden_asserts(calls: list[str], first: list[str], second: list[str]) -> list[str]:
    """Asserts from the calls and the reference's values on two runs (code_outputs_batch's strings). A value
    is kept when it is the same on both runs and the repr of built-in literals that reads back to an equal
    value with the same repr."""
    out = []
    for call, a, b in zip(calls, first, second):
        if a != b or len(a) > MAX_VALUE_REPR or a.startswith("<"):
            continue
        try:
            value = ast.literal_eval(a)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if repr(value) != a or (isinstance(value, float) and not math.isfinite(value)):
            continue
        if isinstance(value, float):
            out.append(f"assert math.isclose({call}, {a}, rel_tol=1e-6, abs_tol=1e-9)")
        elif not _has_float(value):       # a float inside a container would need an exact match
            out.append(f"assert {call} == {a}")
        if len(out) == HIDDEN_PER_PROBLEM:
            break
    return out


def make_hidden_tests(rows: list[dict], progress=True) -> dict[str, list[str]]:
    """rows: {"task_id", "code", "tests", "setup"} -> {str(task_id): hidden asserts}."""
    calls = {r["task_id"]: mutated_calls(r["tests"], f"mbpp-hidden/{r['task_id']}") for r in rows}
    items = [(f"```python\n{r['code']}\n```", calls[r["task_id"]], r["setup"]) for r in rows]
    runs = []
    for _ in range(2):      # twice: a value that differs between runs is not a test
        values = []
        for start in tqdm(range(0, len(items), 32), desc="MBPP hidden tests (reference runs)",
                          disable=not progress, leave=False):
            values += code_outputs_batch(items[start:start + 32])
        lost = sum(any(v.startswith(NOT_RUN) for v in vs) for vs in values)
        if lost:        # tests made without these programs' values would be cached as if they were all
            raise InfrastructureError(f"the sandbox could not run {lost} reference programs: MBPP's hidden "
                                      "tests were not made (nothing cached)")
        runs.append(values)
    return {str(r["task_id"]): hidden_asserts(calls[r["task_id"]], a, b) for r, a, b in zip(rows, *runs)}


def hidden_tests(path: Path, rows: list[dict]) -> dict[str, list[str]]:
    """The hidden tests of every problem in the data file at `path` (rows: all of its problems)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    folder = cache_root() / "mbpp-hidden"
    cached = folder / f"{digest}-v{GENERATOR_VERSION}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    tests = make_hidden_tests(rows)
    folder.mkdir(parents=True, exist_ok=True)
    # Written aside under a name of this process's own and renamed into place: ranks that make the same
    # tests at once each leave a whole file.
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(tests, f)
    os.replace(f.name, cached)
    return tests
