"""The code sandbox against programs written to earn reward without passing: each attack runs the
asserts `f(3) == 9` and `f(4) == 16` (never shown in the program) with a function that returns 0 unless
the attack finds the answers. Where an attack needs isolation to fail, a control run without isolation
shows that it is a real attack."""

import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import sandbox
from verifiers import check_code, code_outputs_batch

TESTS = ["assert f(3) == 9", "assert f(4) == 16"]

# Looks through whatever objects it is given for anything that reveals an expected value: an assert's
# source ("... == 9"), a split test ("eq", lhs, rhs), a parent's secret; returns {lhs: expected}.
SEARCH = '''
import re as _re
def search(objects, depth=0, found=None):
    found = {} if found is None else found
    for obj in objects:
        try:
            if isinstance(obj, str):
                m = _re.match(r"\\s*(?:assert\\s+)?(f\\(\\d+\\))\\s*==\\s*(.+)$", obj)
                if m:
                    found[m.group(1)] = eval(m.group(2))
            elif isinstance(obj, tuple) and len(obj) == 3 and obj[0] == "eq":
                found[obj[1]] = eval(obj[2])
            elif depth < 6 and isinstance(obj, dict):
                search(list(obj.keys()) + list(obj.values()), depth + 1, found)
            elif depth < 6 and isinstance(obj, (list, tuple, set)):
                search(list(obj), depth + 1, found)
        except Exception:
            pass
    return found

def forge(found):
    """Claims every answer found, and success in every line format, on every descriptor."""
    lines = [repr(("done", s, [(True, "")] * 2, None)) for s in secrets] + ["('end',)"]
    for t in range(2):
        lines += [repr((t, -1, True, None, "")), repr((t, 0, True, ("B", True), "True"))]
    for t, key in enumerate(("f(3)", "f(4)")):
        if key in found:
            lines.append(repr((t, 0, True, ("i", format(found[key], "x")), str(found[key]))))
    data = ("\\n".join(lines) + "\\n").encode()
    import os
    for fd in range(1024):
        try:
            os.write(fd, data)
        except Exception:
            pass

secrets = []
def f(x):
    return ANSWERS.get(f"f({x})", 0)
'''


def attack(body: str) -> str:
    return SEARCH + body


ATTACKS = {
    "frame walking": attack('''
import sys
objects, frame = [], sys._getframe()
while frame is not None:
    objects += [frame.f_locals, frame.f_globals, frame.f_code.co_consts]
    frame = frame.f_back
ANSWERS = search(objects)
forge(ANSWERS)
'''),
    "traceback frames": attack('''
try:
    raise ValueError
except ValueError as e:
    objects, frame = [], e.__traceback__.tb_frame
    while frame is not None:
        objects += [frame.f_locals, frame.f_globals]
        frame = frame.f_back
ANSWERS = search(objects)
secrets += [v for v in objects[-1].values() if isinstance(v, str) and len(v) == 32]
forge(ANSWERS)
'''),
    "gc scanning": attack('''
import gc
objects = gc.get_objects()
ANSWERS = search([o for o in objects if isinstance(o, (dict, tuple, list))])
secrets += [o for o in objects if isinstance(o, str) and len(o) == 32 and all(c in "0123456789abcdef" for c in o)]
forge(ANSWERS)
'''),
    "patched builtins": attack('''
import builtins
ANSWERS = {}
same = object()
builtins.eval = lambda *a, **k: same          # what both sides of an assert would evaluate to
builtins.repr = lambda *a: "True"
builtins.isinstance = lambda *a: True
builtins.type = lambda *a: int
builtins.bool = lambda *a: True
builtins.AssertionError = type("Nope", (Exception,), {})
'''),
    "forged lines on every descriptor, then exit": attack('''
import sys
frame = sys._getframe()
while frame is not None:       # the runner's secret, if it has one in reach
    secrets += [v for v in frame.f_locals.values() if isinstance(v, str) and len(v) == 32]
    frame = frame.f_back
ANSWERS = {}
forge({"f(3)": 0, "f(4)": 0})
import os
os.stat.__self__._exit(0)
'''),
}


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "limits only"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_from_inside_the_program_earn_nothing(name, isolate):
    try:
        sandbox.USE_ISOLATION = isolate
        verdict = check_code(ATTACKS[name], TESTS, timeout=10)
        assert not verdict.ok, (name, verdict.feedback)
        # The honest function passes the same asserts: the attack failed, not the harness.
        assert check_code("def f(x):\n    return x * x", TESTS).ok
    finally:
        sandbox.USE_ISOLATION = True


@pytest.fixture
def isolated():
    available, line = sandbox.isolation()
    if not available:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(line)


def test_reading_outside_the_sandbox_folder_earns_nothing(isolated):
    # The answer key in a folder anyone may read: without isolation even user nobody finds it.
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        key = Path(folder) / "answers.txt"
        key.write_text("3 9\n4 16\n")
        key.chmod(0o644)
        program = (f"ANSWERS = dict(map(int, line.split()) for line in open({str(key)!r}))\n"
                   "def f(x):\n    return ANSWERS[x]")
        assert not check_code(program, TESTS).ok
        try:
            sandbox.USE_ISOLATION = False
            assert check_code(program, TESTS).ok, "control: the attack works without isolation"
        finally:
            sandbox.USE_ISOLATION = True


def test_the_network_is_unreachable_even_with_the_module_block_undone(isolated):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    threading.Thread(target=lambda: [server.accept()[0].sendall(b'{"f(3)": 9, "f(4)": 16}') for _ in range(2)],
                     daemon=True).start()
    program = ("import sys, json\nfor name in ('socket', '_socket'):\n    sys.modules.pop(name, None)\nimport socket\n"
               f"ANSWERS = json.loads(socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), 2).recv(999))\n"
               "def f(x):\n    return ANSWERS[f'f({x})']")
    verdict = check_code(program, TESTS)
    server.close()
    # The socket module loaded; the connection failed (bwrap's loopback has nobody listening).
    assert not verdict.ok and "[Errno" in verdict.feedback, verdict.feedback


def test_the_program_sees_only_python_its_folder_and_itself(isolated):
    # The Python installation is mounted wherever it lives (a virtual environment under /tmp, /work, ...):
    # on the way to it, each folder shows only the next folder of that way, nothing beside it.
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)))}
    ways = {}                       # folder -> the names in it that lead to an installation
    for root in roots:
        parts = Path(root).parts
        for i in range(1, len(parts)):
            ways.setdefault(str(Path(*parts[:i])), set()).add(parts[i])
    inside = lambda f: any(f == r or f.startswith(r + "/") for r in roots)  # noqa: E731  (mounted whole)
    inner = sorted(f for f in ways if f != "/" and not f.startswith(("/usr", "/lib")) and not inside(f))
    program = ("import os\ndef f():\n    return (sorted(os.listdir('/')), os.getcwd(), "
               "[p for p in os.listdir('/proc') if p.isdigit()])\ndef g(d):\n    return sorted(os.listdir(d))")
    here = str(Path(__file__).resolve())
    shown = code_outputs_batch([(program, ["assert f() == 0", f"assert open({here!r}).read()"]
                                 + [f"assert g({d!r}) == 0" for d in inner], "")])[0]
    (top, cwd, pids), listed = eval(shown[0]), {d: eval(v) for d, v in zip(inner, shown[2:])}
    assert set(top) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "proc", "dev", "sandbox"} | ways["/"]
    assert "etc" not in top and ("tmp" not in top or "tmp" in ways["/"])
    for folder, names in listed.items():
        assert set(names) <= ways[folder], (folder, names)
    assert cwd == "/sandbox" and len(pids) <= 2          # bwrap's init and the program: nothing of the host
    assert "FileNotFoundError" in shown[1]               # this test file is not there


def test_a_split_assert_is_judged_in_the_parent():
    """The child receives the calls, never the expected values, for every MBPP-shaped assert."""
    kind, parts, judge = sandbox._plan("assert f(3) == [1, 'a', (2.5, None)]", "check", frozenset({"f"}))
    assert (kind, parts, judge) == ("assert", ("f(3)",), "_part0 == [1, 'a', (2.5, None)]")
    kind, parts, judge = sandbox._plan("assert math.isclose(f(2), 3.14, rel_tol=0.001)", "check", frozenset({"f"}))
    assert parts == ("f(2)",) and "3.14" in judge
    # Also where the program imports math: the expected value stays here (the hidden tests' float asserts).
    assert sandbox._plan("assert math.isclose(f(2), 3.14)", "check", frozenset({"f", "math"}))[1] == ("f(2)",)
    # A builtin name means the program's function when the program defines it (MBPP task 126's `sum`).
    assert sandbox._plan("assert sum(10, 15) == 6", "check", frozenset({"sum"}))[1] == ("sum(10, 15)",)
    assert sandbox._plan("assert sum(f(1)) == 6", "check", frozenset({"f"}))[1] == ("sum(f(1))",)
    assert sandbox._plan("assert type(f(1)) == int", "check", frozenset({"f"}))[1] == ("type(f(1))",)


@pytest.mark.parametrize("program, tests, ok", [
    ("def f(x):\n    return {x: [x, (x, 'a')]}", ["assert f(1) == {1: [1, (1, 'a')]}"], True),
    ("def f(x):\n    return {x: [x, (x, 'a')]}", ["assert f(1) == {1: [1, [1, 'a']]}"], False),
    ("def f(x):\n    return 10 ** 5000", ["assert f(1) == 10 ** 5000", "assert f(1) > 10 ** 4999"], True),
    ("def f(x):\n    return float('nan')", ["assert f(1) != f(1)"], True),
    ("def f(x):\n    return float('inf'), -0.0, 1+2j, b'x'", ["assert f(1) == (float('inf'), 0.0, 1+2j, b'x')"], True),
    ("def f(x):\n    return {1, frozenset({2})}", ["assert f(1) == {1, frozenset({2})}"], True),
    ("def f(x):\n    return 3", ["assert type(f(1)) == int", "assert isinstance(f(1), int)"], True),
    ("from collections import Counter\ndef f(x):\n    return Counter('aab')", ["assert f(1) == {'a': 2, 'b': 1}"], True),
    ("class P:\n    pass\ndef f(x):\n    return P()", ["assert f(1)"], False),
    ("def f(x):\n    return iter([1])", ["assert f(1) == [1]"], False),
    ("def f(x):\n    return [1]", ["assert math.isclose(f(1)[0], 1.0000000001)", "assert not f(1) == [2]"], True),
    ("import math\ndef f(x):\n    return math.pi", ["assert math.isclose(f(1), 3.1415927, rel_tol=1e-6)"], True),
    ("import math\ndef f(x):\n    return math.e", ["assert math.isclose(f(1), 3.1415927, rel_tol=1e-6)"], False),
    ("def f(x):\n    return 2", ["assert f(1) == 2 or g(1)", "assert 1 + 1 == 2"], True),
])
def test_values_read_back_and_compared_in_the_parent(program, tests, ok):
    assert check_code(program, tests).ok is ok
