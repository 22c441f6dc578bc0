"""Binary verifiers with feedback: the reward of RRR and the environment feedback of Re-ReST.

Each checker takes a raw model completion (any string at all) and returns Verdict(ok, feedback), where
feedback is one short, specific sentence a reflector can act on. No checker raises on a completion.

    check_countdown(completion, nums, target)        last <answer>, exact rational arithmetic, own parser
    check_function_calls(completion, answers)        xLAM/APIGen calls or BFCL possible answers
    check_code(completion, tests, setup, timeout)    MBPP asserts run in a fresh, limited process
    check_code_batch(items, workers, timeout)        the same for many programs, in parallel
    code_outputs_batch(items, workers, timeout)      what each program returns on the tests' inputs
    check_math(completion, answer)                   GSM8K: the final number

The code sandbox is NOT a security boundary. It runs each program in its own process and session
with memory, CPU, file-size and open-file limits, a wall-clock timeout that kills the whole process
group (and any process left in its session), a fresh temporary working directory, stdout and stderr
sent to /dev/null, and destructive functions (deleting or renaming files, os.system, fork, kill,
subprocess, ctypes, ...) disabled before the program starts. That stops accidents and the reward
hacks a policy model stumbles on: exiting early, printing a fake success, objects whose __eq__ always
says True, forking, sleeping past the timeout, flooding the output. It does not stop a program written
to escape (one that digs the runner's secrets out of memory, say). Run untrusted code in a container
or a VM.
"""

import ast
import functools
import inspect
import json
import marshal
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import NamedTuple


class Verdict(NamedTuple):
    ok: bool
    feedback: str


def short(value, limit=200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- Countdown ---------------------------------------------------------------------------------------

MAX_EXPRESSION, MAX_DEPTH, MAX_DIGITS = 200, 20, 6


def check_countdown(completion: str, nums, target) -> Verdict:
    answers = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.S)
    if not answers:
        return Verdict(False, "no <answer>...</answer> tag")
    expression = answers[-1].strip()
    if not expression:
        return Verdict(False, "the answer is empty")
    if len(expression) > MAX_EXPRESSION:
        return Verdict(False, f"the answer is longer than {MAX_EXPRESSION} characters")
    try:
        tokens = _tokens(expression)
        value, used = _Parser(tokens).parse()
    except ValueError as e:
        return Verdict(False, str(e))
    given, got = Counter(nums), Counter(used)
    for n in sorted(got):
        if n not in given:
            return Verdict(False, f"uses {n}, which is not one of the numbers {list(nums)}")
        if got[n] > given[n]:
            times = {2: "twice", 3: "three times"}.get(got[n], f"{got[n]} times")
            return Verdict(False, f"uses {n} {times}" + (f", but it is given {given[n]} times" if given[n] > 1 else ""))
    missing = sorted((given - got).elements())
    if missing:
        return Verdict(False, f"does not use {', '.join(map(str, missing))}")
    if value != target:
        shown = str(value) if value.denominator == 1 else f"{value} (about {float(value):.4g})"
        return Verdict(False, f"equals {shown}, not {target}")
    return Verdict(True, f"correct: equals {target}")


def _tokens(text: str) -> list:
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "0123456789":
            j = i
            while j < len(text) and text[j] in "0123456789":
                j += 1
            if j - i > MAX_DIGITS:
                raise ValueError(f"the number {text[i:j][:12]}... is too long")
            tokens.append(int(text[i:j]))
            i = j
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        else:
            raise ValueError(f"unexpected character {c!r}: only numbers, + - * / and parentheses are allowed")
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
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.tokens[self.i]
            self.i += 1
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth):
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.tokens[self.i]
            self.i += 1
            right = self.factor(depth)
            if op == "/" and right == 0:
                raise ValueError("division by zero")
            value = value * right if op == "*" else value / right
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
        raise ValueError(f"expected a number or '(', got {token!r}" + (" (no unary minus)" if token == "-" else ""))


# --- function calls ----------------------------------------------------------------------------------

def parse_calls(completion: str):
    """The calls in a completion as a list of {"name", "arguments"} dicts, or None if none can be read.
    Looks in <tool_call> tags first, then the last ```json fence, then the first JSON list or object."""
    tagged = re.findall(r"<tool_call>(.*?)</tool_call>", completion, flags=re.S)
    if tagged:
        calls = []
        for block in tagged:
            found = _first_json(block)
            if found is None:
                return None
            calls += found if isinstance(found, list) else [found]
        return _normalise(calls)
    fences = re.findall(r"```(?:json)?\s*(.*?)```", completion, flags=re.S)
    found = _first_json(fences[-1]) if fences else None
    if found is None:
        found = _first_json(completion)
    if found is None:
        return None
    return _normalise(found if isinstance(found, list) else [found])


def _first_json(text: str):
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            return decoder.raw_decode(text, m.start())[0]
        except (json.JSONDecodeError, RecursionError):
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
            except json.JSONDecodeError:
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


def check_function_calls(completion: str, answers: list) -> Verdict:
    calls = parse_calls(completion)
    if calls is None:
        return Verdict(False, "no JSON list of calls found")
    xlam = _is_xlam(answers)
    if xlam:
        answers = _normalise(answers) or []
    if len(calls) != len(answers):
        return Verdict(False, f"expected {len(answers)} call{'s' * (len(answers) != 1)}, got {len(calls)}")
    match = _call_matches_xlam if xlam else _call_matches_bfcl
    if _perfect_matching(len(answers), lambda i, j: match(calls[j], answers[i]) is None):
        return Verdict(True, "correct calls")
    # Explain the first expected call that no call satisfies, against the closest call of its name.
    names = {c["name"] for c in calls}
    for answer in answers:
        name = answer["name"] if xlam else next(iter(answer))
        problems = [match(c, answer) for c in calls if c["name"] == name]
        if not problems:
            wrong = sorted(names - ({a["name"] for a in answers} if xlam else {next(iter(a)) for a in answers}))
            return Verdict(False, f"unknown function {wrong[0]!r}" if wrong else f"no call to {name}")
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


def _call_matches_xlam(call, answer) -> str | None:
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


def _call_matches_bfcl(call, answer) -> str | None:
    name, params = next(iter(answer.items()))
    if call["name"] != name:
        return f"called {call['name']}, expected {name}"
    got = call["arguments"]
    for key in got:
        if key not in params:
            return f"unexpected argument {key!r} in {name}"
    for key, acceptable in params.items():
        if key not in got:
            if "" not in acceptable:
                return f"missing argument {key!r} in {name}"
        elif not any(_bfcl_same(got[key], ok) for ok in acceptable if ok != ""):
            shown = [a for a in acceptable if a != ""]
            return f"argument {key!r} of {name} is {short(got[key], 60)}, expected {short(shown[0] if len(shown) == 1 else shown, 60)}"
    return None


def _bfcl_same(value, acceptable) -> bool:
    """BFCL's rules: strings compared without case, spaces and ,./-_*^; an int where a float is expected."""
    if isinstance(acceptable, str):
        return isinstance(value, str) and _loose(value) == _loose(acceptable)
    if isinstance(acceptable, bool) or isinstance(value, bool):
        return type(value) is type(acceptable) and value == acceptable
    if isinstance(acceptable, float):
        return isinstance(value, (int, float)) and value == acceptable
    if isinstance(acceptable, int):
        return type(value) is int and value == acceptable
    if isinstance(acceptable, list):
        return (isinstance(value, list) and len(value) == len(acceptable)
                and all(_bfcl_same(v, a) for v, a in zip(value, acceptable)))
    if isinstance(acceptable, dict):   # each entry lists its acceptable values, "" meaning optional
        if not isinstance(value, dict) or set(value) - set(acceptable):
            return False
        return all((k in value and any(_bfcl_same(value[k], x) for x in (v if isinstance(v, list) else [v]) if x != ""))
                   or (k not in value and isinstance(v, list) and "" in v) for k, v in acceptable.items())
    return value == acceptable


def _loose(text: str) -> str:
    return re.sub(r"[\s,./\-_*^]", "", text.lower())


# --- math (GSM8K) ------------------------------------------------------------------------------------

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def _to_number(text: str) -> Fraction | None:
    text = text.replace(",", "").rstrip(".")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def check_math(completion: str, answer) -> Verdict:
    if isinstance(answer, str):
        ref = answer.split("####")[-1].strip()
        expected = _to_number(ref)
    else:
        expected = Fraction(str(answer))
    if expected is None:
        raise ValueError(f"reference answer {answer!r} has no number")
    after = completion.split("####")[-1] if "####" in completion else None
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    for source in (after, boxed[-1] if boxed else None, completion):
        if source is None:
            continue
        found = re.findall(_NUMBER, source)
        if found:
            got = _to_number(found[0] if source is after else found[-1])
            break
    else:
        return Verdict(False, "no number found")
    if got is None:
        return Verdict(False, "no number found")
    if got == expected:
        return Verdict(True, f"correct: {short(str(expected))}")
    shown = lambda x: str(x) if x.denominator == 1 else f"{float(x):g}"  # noqa: E731
    return Verdict(False, f"answer {shown(got)}, expected {shown(expected)}")


# --- code: a fresh, limited process per program ------------------------------------------------------

MEMORY_LIMIT = 1 << 30           # bytes of address space
FILE_LIMIT = 16 << 20            # bytes per file written
RESULT_LIMIT = 1 << 20           # bytes of results read back
NOBODY = 65534                   # the user id the child switches to when started as root
# Imported before that switch, since a Python installed under /root cannot be read by nobody: what
# MBPP's solutions import, and a few more. Each costs start-up time, so the list is short; a program
# that imports something else works when the Python installation is readable by everyone.
PRELOADED_MODULES = ("re", "math", "cmath", "collections", "heapq", "itertools", "functools", "operator", "bisect",
                     "array", "copy", "datetime", "string", "struct", "time", "random")
BLOCKED_MODULES = ("ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing",
                   "socket", "_socket", "pty", "shutil", "signal", "_signal", "faulthandler", "threading",
                   "_thread", "asyncio", "concurrent", "mmap", "posix", "_posixshmem", "importlib.util")


def extract_program(completion: str) -> str:
    """The last ```python (or ```) block, else [PYTHON]...[/PYTHON], else [BEGIN]...[DONE], else the text.
    A fence cut off by the length limit counts up to the end."""
    for pattern in (r"```(?:python|py|Python)[ \t]*\n(.*?)(?:```|\Z)", r"```[ \t]*\n(.*?)(?:```|\Z)",
                    r"\[PYTHON\](.*?)(?:\[/PYTHON\]|\Z)", r"\[BEGIN\](.*?)(?:\[DONE\]|\Z)"):
        blocks = re.findall(pattern, completion, flags=re.S)
        if blocks:
            return blocks[-1].strip("\n")
    return completion


def _sandbox_child():
    """Runs in the child process (its source is sent to `python -I -S -c`): reads the job from stdin,
    limits itself, disables destructive functions, runs the program and the tests, and reports each
    test on the result pipe. Only the last line, which carries the parent's secret, can say "all
    passed"; a program that exits early never writes it. It imports as little as it can: start-up
    time is most of the cost of a check."""
    import builtins
    import io
    import marshal
    import os
    import resource
    import sys
    job = marshal.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    report = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    nonce = job.pop("nonce")
    for name in job["preload"]:     # after the switch to nobody below, a root-only install is unreadable
        try:
            __import__(name)
        except ImportError:
            pass
    if os.getuid() == 0:
        # Root ignores the process-count limit and every file permission: run as nobody instead.
        os.setgroups([])
        os.setgid(job["nobody"])
        os.setuid(job["nobody"])
    # NPROC 1: this process is already one of the user's, so fork (and threads) fail.
    for limit, value in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_FSIZE, job["file_size"]),
                         (resource.RLIMIT_CPU, job["cpu"]), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_NPROC, 1)):
        resource.setrlimit(limit, (value, value))
    # Private references, taken before the program can replace builtins.
    _type, _repr, _isinstance, _len, _str, _bool = type, repr, isinstance, len, str, bool
    _BaseException, _AssertionError, _exit, _realpath = BaseException, AssertionError, os._exit, os.path.realpath
    plain_types = (int, float, complex, str, bytes, bool, type(None))
    opaque = object()

    def plain(x, depth=0):
        """Built-in values all the way down."""
        t = _type(x)
        if t in plain_types:
            return True
        if t in (list, tuple, set, frozenset) and depth < 20:
            return all(plain(i, depth + 1) for i in x)
        if t is dict and depth < 20:
            return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in x.items())
        return False

    def canon(x, depth=0):
        """x as built-in values, read through the built-in types' own methods, so that a subclass
        (Counter, defaultdict, or the program's own class) cannot answer for itself; anything else
        becomes an object that equals nothing."""
        if _type(x) in plain_types or depth > 20:
            return x if depth <= 20 else opaque
        for base, read in ((bool, bool.__bool__), (int, int.__int__), (float, float.__float__),
                           (complex, complex.__complex__), (str, str.__str__), (bytes, bytes)):
            if _isinstance(x, base):
                return read(x)
        if _isinstance(x, dict):
            return {canon(k, depth + 1): canon(v, depth + 1) for k, v in dict.items(x)}
        for base in (list, tuple, set, frozenset):
            if _isinstance(x, base):
                return base(canon(i, depth + 1) for i in base.__iter__(x))
        return opaque

    def describe(e):
        return "assertion failed" if _isinstance(e, _AssertionError) else f"{_type(e).__name__}: {e}"[:200]

    for module, names in ((os, ("system", "popen", "kill", "killpg", "fork", "forkpty", "setsid", "setpgid",
                                "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
                                "truncate", "chmod", "chown", "lchown", "putenv", "unsetenv", "execv", "execve",
                                "execvp", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "chdir", "chroot",
                                "link", "symlink", "mkfifo", "_exit", "abort")),
                          (resource, ("setrlimit", "prlimit")), (builtins, ("exit", "quit", "help", "input"))):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, None)
    for name in job["blocked"]:
        sys.modules[name] = None
    # Files may be written only inside the sandbox's own folder (the working directory).
    here = _realpath(os.getcwd())
    _open, _os_open = io.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path):
        full = _realpath(path if _isinstance(path, (str, bytes)) else _str(path))
        full = full.decode() if _isinstance(full, bytes) else full
        return full == here or full.startswith(here + "/")

    def guarded_open(file, mode="r", *args, **kwargs):
        if _isinstance(file, int) or (any(c in mode for c in "wax+") and not inside(file)):
            raise PermissionError(f"the sandbox does not write outside its folder: {file!r}")
        return _open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            raise PermissionError(f"the sandbox does not write outside its folder: {path!r}")
        return _os_open(path, flags, *args, **kwargs)
    builtins.open = io.open = guarded_open
    os.open = guarded_os_open

    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(job["program"], "solution.py", "exec"), namespace)
        exec(compile(job["setup"], "setup.py", "exec"), namespace)   # MBPP's setup may use the program's classes
        failure = None
    except SyntaxError as e:
        failure = f"SyntaxError: {e.msg} (line {e.lineno})"
    except _BaseException as e:   # SystemExit included: exiting is not passing
        failure = describe(e)
    results = []
    for kind, first, second in job["tests"]:
        if failure is not None:
            results.append((False, failure))
            continue
        try:
            if kind == "value":            # code_outputs_batch: what the program computes
                results.append((True, _repr(eval(first, namespace))[:200]))
            elif kind == "eq":             # assert <first> == <second>
                got, want = eval(first, namespace), eval(second, namespace)
                # A built-in expected value is compared with the built-in reading of the output, so
                # an object whose __eq__ always agrees fails; otherwise both directions must agree.
                if plain(want):
                    equal = (canon(got) == want) is True
                else:
                    equal = (got == want) is True and (want == got) is True
                results.append((_bool(equal), _repr(got)[:200]))
            else:
                exec(first, namespace)
                results.append((True, ""))
        except _BaseException as e:
            results.append((False, describe(e)))
        report.write(_repr(("test", _len(results) - 1) + results[-1]) + "\n")
    report.write(_repr(("done", nonce, results, failure)) + "\n")
    report.flush()
    _exit(0)


@functools.lru_cache(maxsize=4096)
def _split_test(test: str, mode: str) -> tuple:
    """A test as (kind, first, second) for the child: ("eq", lhs, rhs) for `assert lhs == rhs`, so each
    side is evaluated on its own; ("stmt", source, "") otherwise; ("value", expression, "") for outputs."""
    try:
        body = ast.parse(test).body
    except SyntaxError:
        return ("stmt", test, "")
    node = body[0] if len(body) == 1 else None
    expr = node.test if isinstance(node, ast.Assert) else node.value if isinstance(node, ast.Expr) else None
    is_eq = isinstance(expr, ast.Compare) and len(expr.ops) == 1 and isinstance(expr.ops[0], ast.Eq)
    if mode == "outputs":
        return ("value", ast.unparse(expr.left if is_eq else expr), "") if expr is not None else ("stmt", test, "")
    if is_eq and isinstance(node, ast.Assert):
        return ("eq", ast.unparse(expr.left), ast.unparse(expr.comparators[0]))
    return ("stmt", test, "")


_CHILD_SOURCE = None


def _child_source() -> str:
    global _CHILD_SOURCE
    if _CHILD_SOURCE is None:
        _CHILD_SOURCE = inspect.getsource(_sandbox_child) + "\n_sandbox_child()\n"
    return _CHILD_SOURCE


def _kill_session(sid: int):
    """SIGKILL the process group and any process still in the session (a child that changed group)."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:      # field 6 of stat, counted after the command name
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            continue


def _run(completion: str, tests, setup: str, timeout: float, mode: str) -> dict:
    """Runs one program in the sandbox. Returns {"done": bool, "results": [[ok, output], ...],
    "failure": str | None, "timed_out": bool}."""
    nonce = secrets.token_hex(16)
    job = marshal.dumps(dict(nonce=nonce, program=extract_program(completion), setup=setup or "",
                             tests=[_split_test(t, mode) for t in tests], memory=MEMORY_LIMIT, file_size=FILE_LIMIT,
                             cpu=int(timeout) + 1, blocked=BLOCKED_MODULES, preload=PRELOADED_MODULES, nobody=NOBODY))
    read_end, write_end = os.pipe()
    lines, done, timed_out = [], None, False
    with tempfile.TemporaryDirectory(prefix="rrr-sandbox-") as folder:
        if os.getuid() == 0:
            os.chown(folder, NOBODY, NOBODY)      # the child runs as nobody (see _sandbox_child)
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _child_source(), str(write_end)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd=folder, pass_fds=(write_end,), start_new_session=True,
                                    env={"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LC_ALL": "C.UTF-8"})
        finally:
            os.close(write_end)
        try:
            deadline = time.monotonic() + timeout
            try:
                proc.stdin.write(job)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            buffer, size = b"", 0
            with selectors.DefaultSelector() as sel:
                sel.register(read_end, selectors.EVENT_READ)
                while done is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        timed_out = True
                        break
                    if not sel.select(left):
                        continue
                    chunk = os.read(read_end, 65536)
                    if not chunk:
                        break       # every writer is gone
                    size += len(chunk)
                    if size > RESULT_LIMIT:
                        break
                    buffer += chunk
                    *complete, buffer = buffer.split(b"\n")
                    for raw in complete:
                        try:
                            row = ast.literal_eval(raw.decode("utf-8", "replace"))
                        except (ValueError, SyntaxError, MemoryError, RecursionError):
                            continue
                        if isinstance(row, tuple) and len(row) == 4 and row[:2] == ("done", nonce):
                            done = dict(results=row[2], failure=row[3])
                        elif isinstance(row, tuple) and len(row) == 4 and row[0] == "test":
                            lines.append(row)
        finally:
            _kill_session(proc.pid)
            proc.wait()
            os.close(read_end)
    if done is not None:
        return dict(done=True, results=done["results"], failure=done["failure"], timed_out=False)
    partial = [[bool(r[2]), str(r[3])] for r in lines][:len(tests)]
    return dict(done=False, results=partial, failure=None, timed_out=timed_out)


def _feedback(tests, run: dict, timeout: float) -> Verdict:
    results = run["results"]
    if run["done"] and run["failure"] and not any(ok for ok, _ in results):
        return Verdict(False, run["failure"] if not tests else f"{run['failure']}; no test could run")
    if run["done"] and results and all(ok for ok, _ in results) and len(results) == len(tests):
        return Verdict(True, "Tests passed:\n" + "\n".join(tests))
    if not run["done"] and not results:
        why = f"timed out after {timeout:g} s" if run["timed_out"] else "the program stopped before the tests ran"
        return Verdict(False, why + " (exiting, a crash, or the memory limit)" * (not run["timed_out"]))
    passed = [t for t, (ok, _) in zip(tests, results) if ok]
    failed = [f"{t}  # output: {short(out)}" for t, (ok, out) in zip(tests, results) if not ok]
    missing = tests[len(results):]
    if missing:
        label = "TIMEOUT" if run["timed_out"] else "the program stopped here"
        failed += [f"{missing[0]}  # output: {label}"] + [f"{t}  # output: not run" for t in missing[1:]]
    return Verdict(False, "\n".join(["Tests passed:"] + (passed or ["(none)"]) + ["Tests failed:"] + failed))


def check_code(completion: str, tests, setup: str = "", timeout: float = 5.0) -> Verdict:
    """Passes only when the program and every assert in `tests` ran in the sandbox and passed."""
    return check_code_batch([(completion, tests, setup)], workers=1, timeout=timeout)[0]


def _batch(items, workers, timeout, mode):
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    items = [(c if isinstance(c, str) else str(c), list(t), s or "") for c, t, s in items]
    workers = max(1, min(workers or os.cpu_count() or 1, len(items) or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda item: (item[1], _run(*item, timeout, mode)), items))


def check_code_batch(items, workers: int | None = None, timeout: float = 5.0) -> list[Verdict]:
    """items: (completion, tests, setup) triples. Verdicts in order; `workers` programs at a time
    (default: one per CPU core). Every process is gone when this returns."""
    return [_feedback(tests, run, timeout) for tests, run in _batch(items, workers, timeout, "check")]


def code_outputs_batch(items, workers: int | None = None, timeout: float = 5.0) -> list[list[str]]:
    """For each (completion, tests, setup): the repr of what each test's left-hand side evaluates to
    (the program's output on that test's input), never looking at the expected value; "<Error: ...>"
    or "<TIMEOUT>" where it has none. Re-ReST's self-consistency votes with these."""
    out = []
    for tests, run in _batch(items, workers, timeout, "outputs"):
        values = [v if ok else f"<{v}>" for ok, v in run["results"]]
        if run["done"] and run["failure"]:
            values = [f"<{run['failure']}>"] * len(tests)
        out.append(values + ["<TIMEOUT>" if run["timed_out"] else "<not run>"] * (len(tests) - len(values)))
    return out
