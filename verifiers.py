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

import inspect
import json
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
        calls = [{"name": name, "arguments": {p: v[0] for p, v in params.items() if v and v[0] != ""}}
                 for entry in calls for name, params in entry.items()]
    return json.dumps(calls, ensure_ascii=False)


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
BLOCKED_MODULES = ("ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing", "_multiprocessing",
                   "socket", "_socket", "pty", "shutil", "signal", "_signal", "faulthandler", "threading",
                   "_thread", "asyncio", "concurrent", "mmap", "importlib.util")


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
    passed"; a program that exits early never writes it."""
    import json
    import os
    import resource
    import sys
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    report = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    nonce = job.pop("nonce")
    for limit, value in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_FSIZE, job["file_size"]),
                         (resource.RLIMIT_CPU, job["cpu"]), (resource.RLIMIT_NOFILE, 64)):
        resource.setrlimit(limit, (value, value))
    # Private references, taken before the program can replace builtins.
    _type, _repr, _isinstance, _len, _str, _bool = type, repr, isinstance, len, str, bool
    _dumps, _BaseException, _exit = json.dumps, BaseException, os._exit
    plain_types = (int, float, complex, str, bytes, bool, type(None))
    containers = (list, tuple, set, frozenset, dict)

    def plain(x, depth=0):
        """Built-in values only, all the way down: no object of the program's own classes."""
        t = _type(x)
        if t in plain_types:
            return True
        if t in containers and depth < 20:
            items = list(x.items()) if t is dict else x
            return all(plain(i, depth + 1) if t is not dict else plain(i[0], depth + 1) and plain(i[1], depth + 1)
                       for i in items)
        return False

    def describe(e):
        return f"{_type(e).__name__}: {e}"[:200]

    def send(obj):
        report.write(_dumps(obj) + "\n")

    import ast
    import builtins
    import shutil  # noqa: F401  (imported to be disabled below)
    for module, names in ((os, ("system", "popen", "kill", "killpg", "fork", "forkpty", "setsid", "setpgid",
                                "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
                                "truncate", "chmod", "chown", "lchown", "putenv", "unsetenv", "execv", "execve",
                                "execvp", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "chdir", "chroot",
                                "link", "symlink", "mkfifo", "_exit", "abort")),
                          (shutil, ("rmtree", "move", "chown", "copytree")),
                          (resource, ("setrlimit", "prlimit")), (builtins, ("exit", "quit", "help", "input"))):
        for name in names:
            if hasattr(module, name):
                setattr(module, name, None)
    for name in job["blocked"]:
        sys.modules[name] = None
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(job["setup"] + "\n" + job["program"], "solution.py", "exec"), namespace)
        failure = None
    except SyntaxError as e:
        failure = f"SyntaxError: {e.msg} (line {e.lineno})"
    except _BaseException as e:   # SystemExit included: exiting is not passing
        failure = describe(e)
    results = []
    for test in job["tests"]:
        if failure is not None:
            results.append([False, failure])
            continue
        try:
            node = ast.parse(test).body[0]
            if job["mode"] == "outputs":
                expr = node.test if _isinstance(node, ast.Assert) else node.value
                if _isinstance(expr, ast.Compare) and _len(expr.ops) == 1 and _isinstance(expr.ops[0], ast.Eq):
                    expr = expr.left
                value = eval(compile(ast.Expression(expr), "test", "eval"), namespace)
                results.append([True, _repr(value)[:200]])
            elif (_isinstance(node, ast.Assert) and _isinstance(node.test, ast.Compare) and _len(node.test.ops) == 1
                  and _isinstance(node.test.ops[0], ast.Eq)):
                got = eval(compile(ast.Expression(node.test.left), "test", "eval"), namespace)
                want = eval(compile(ast.Expression(node.test.comparators[0]), "test", "eval"), namespace)
                # Both directions must say exactly True, and a built-in expected value must be matched
                # by built-in values: an object whose __eq__ always agrees fails here.
                equal = (not plain(want) or plain(got)) and (got == want) is True and (want == got) is True
                results.append([_bool(equal), _repr(got)[:200]])
            else:
                exec(compile(test, "test", "exec"), namespace)
                results.append([True, ""])
        except _BaseException as e:
            results.append([False, describe(e) if not _isinstance(e, AssertionError) else "assertion failed"])
        send({"test": _len(results) - 1, "ok": results[-1][0], "output": results[-1][1]})
    send({"nonce": nonce, "results": results, "failure": failure})
    report.flush()
    _exit(0)


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
    job = json.dumps(dict(nonce=nonce, program=extract_program(completion), setup=setup or "", tests=list(tests),
                          mode=mode, memory=MEMORY_LIMIT, file_size=FILE_LIMIT, cpu=int(timeout) + 1,
                          blocked=BLOCKED_MODULES))
    read_end, write_end = os.pipe()
    lines, done, timed_out = [], None, False
    with tempfile.TemporaryDirectory(prefix="rrr-sandbox-") as folder:
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
                proc.stdin.write(job.encode())
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
                            row = json.loads(raw)
                        except ValueError:
                            continue
                        if isinstance(row, dict) and row.get("nonce") == nonce:
                            done = row
                        elif isinstance(row, dict) and "test" in row:
                            lines.append(row)
        finally:
            _kill_session(proc.pid)
            proc.wait()
            os.close(read_end)
    if done is not None:
        return dict(done=True, results=done["results"], failure=done["failure"], timed_out=False)
    partial = [[bool(r.get("ok")), str(r.get("output", ""))] for r in lines][:len(tests)]
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
    return Verdict(False, "Tests passed:\n" + "\n".join(passed) + "\nTests failed:\n" + "\n".join(failed))


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
