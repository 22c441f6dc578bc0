"""A fresh, isolated process per program: what verifiers.check_code runs MBPP-style programs in.

The verdict is decided where the program cannot reach. The parent splits each assert (`_plan`): the
parts that need the program (for `assert f(3) == 9`, the call `f(3)`) go to the child; the expected
value and the comparison stay here. The child sends back each part's value as built-in data, read
through the built-in types' own methods (anything else is an object that equals nothing), and the
parent compares. Everything the child writes is the program's claim: it may walk frames, scan `gc`,
read tracebacks, patch builtins, define classes whose `__eq__` always agrees, or forge lines on every
descriptor. None of it makes a failing test pass: the expected values and the verdict are not in its
process, and claiming a value is no different from returning it.

What this cannot stop: a program that special-cases the inputs of the tests it is shown (MBPP's prompt
lists its asserts, expected values included); data/mbpp_hidden.py's hidden tests are the answer to that.
An expected value the parent cannot keep (one written with a name the program defines, or inside an
expression with the call, as in `abs(f(x) - 3.1) < 1e-6`, split only at the `<`) is computed by the
child; MBPP's 2,935 asserts are all `call == literal`. A test that is not an assert passes when the
program says it ran.

Isolation (Linux, bubblewrap): each program gets no network (its own network namespace), its own PID
namespace, and a filesystem with only the system's /usr, the Python installation (both read-only) and
its scratch folder: no project files, no data (MBPP's solutions are the answer key), no home. Where bwrap
is missing or cannot make namespaces, `isolation()` says so in one line and programs run with the limits
below only; `rerest.py --require-isolation` refuses instead.

Limits, isolated or not: a new session, as user nobody when started as root, limits on memory, CPU
time, file size, open files and processes (fork fails), writes only inside its folder, no stdout or
stderr, destructive functions (os.system, deleting files, fork, kill, subprocess, ctypes, sockets, ...)
disabled. A wall-clock timeout kills the process group and anything left in the session. Without
isolation, a program written to undo those Python-level blocks can read what user nobody can read.
"""

import ast
import builtins
import cmath
import functools
import marshal
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runs import local_share_of_cores

MEMORY_LIMIT = 1 << 30           # bytes of address space
FILE_LIMIT = 16 << 20            # bytes per file written
VALUE_LIMIT = 1 << 20            # bytes of one value sent back (an output larger than this fails its test)
RESULT_LIMIT = 8 << 20           # bytes read back from one program in all
NOBODY = 65534                   # the user id the child switches to when started as root
# Imported before that switch, since a Python installed under /root cannot be read by nobody without
# isolation: what MBPP's solutions import, and a few more. Each costs start-up time.
PRELOADED_MODULES = ("re", "math", "cmath", "collections", "heapq", "itertools", "functools", "operator",
                     "bisect", "array", "copy", "datetime", "string", "struct", "time", "random")
BLOCKED_MODULES = ("ctypes", "_ctypes", "subprocess", "_posixsubprocess", "multiprocessing",
                   "_multiprocessing", "socket", "_socket", "pty", "shutil", "signal", "_signal",
                   "faulthandler", "threading", "_thread", "asyncio", "concurrent", "mmap", "posix",
                   "_posixshmem", "importlib.util")
# Names an assert may use that the parent evaluates itself: the builtins and these modules.
JUDGE_MODULES = {"math": math, "cmath": cmath}


def extract_program(completion: str) -> str:
    """The last ```python (or ```) block, else [PYTHON]...[/PYTHON], else [BEGIN]...[DONE], else the text.
    A fence cut off by the length limit counts up to the end."""
    for pattern in (r"```(?:python|py|Python)[ \t]*\n(.*?)(?:```|\Z)", r"```[ \t]*\n(.*?)(?:```|\Z)",
                    r"\[PYTHON\](.*?)(?:\[/PYTHON\]|\Z)", r"\[BEGIN\](.*?)(?:\[DONE\]|\Z)"):
        blocks = re.findall(pattern, completion, flags=re.S)
        if blocks:
            return blocks[-1].strip("\n")
    return completion


# --- the parent: splits each test, decides each verdict -------------------------------------------------

_JUDGED_HERE = (ast.Compare, ast.BoolOp, ast.Tuple, ast.List, ast.Set, ast.Dict)
_BUILTIN_NAMES = frozenset(dir(builtins)) | frozenset(JUDGE_MODULES)


def _names_bound(program: str) -> frozenset:
    """Every name the program binds anywhere (more than its globals, which only sends more to the
    child): a test's `sum(10, 15)` means the program's `sum` when it defines one, the builtin otherwise."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError, SystemError):
        # SystemError: CPython 3.11's "AST constructor recursion depth mismatch" on deep nesting (gh-106905)
        return frozenset()
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.alias):
            names.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            names.update(n.names)
    return frozenset(names)


@functools.lru_cache(maxsize=4096)
def _plan(test: str, mode: str, program_names: frozenset = frozenset()) -> tuple:
    """A test as (kind, parts, judge). kind "assert": `parts` are the sub-expressions the child evaluates
    (the smallest that use a name other than a builtin the program does not redefine, below
    comparisons, and/or/not, containers and math.isclose) and `judge` is the assert's expression with
    them replaced by _part0, _part1, ..., evaluated here. Literals never leave the parent. kind
    "value" (mode "outputs"): one part, an assert's left-hand side or the expression itself. kind
    "stmt": anything else, run whole by the child."""
    try:
        body = ast.parse(test).body
    except SyntaxError:
        return ("stmt", (test,), None)
    node = body[0] if len(body) == 1 else None
    expr = node.test if isinstance(node, ast.Assert) else node.value if isinstance(node, ast.Expr) else None
    if expr is None or (mode == "check" and not isinstance(node, ast.Assert)):
        return ("stmt", (test,), None)
    if mode == "outputs":
        is_eq = isinstance(expr, ast.Compare) and len(expr.ops) == 1 and isinstance(expr.ops[0], ast.Eq)
        return ("value", (ast.unparse(expr.left if is_eq else expr),), None)
    parts = []

    def split(n):
        if not any(isinstance(x, ast.Name) and (x.id not in _BUILTIN_NAMES or x.id in program_names)
                   for x in ast.walk(n)):
            return n
        isclose = (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "isclose"
                   and isinstance(n.func.value, ast.Name) and n.func.value.id in JUDGE_MODULES)
        negation = isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not)
        if isinstance(n, _JUDGED_HERE) or isclose or negation:
            for field, value in ast.iter_fields(n):
                if isclose and field == "func":
                    continue        # the parent's math.isclose, also where the program imports math itself
                if isinstance(value, ast.expr):
                    setattr(n, field, split(value))
                elif isinstance(value, list):
                    setattr(n, field, [split(v) if isinstance(v, ast.expr) else v for v in value])
            for keyword in getattr(n, "keywords", []):
                keyword.value = split(keyword.value)
            return n
        parts.append(ast.unparse(n))
        return ast.Name(f"_part{len(parts) - 1}", ast.Load())
    judge = ast.unparse(split(expr))
    return ("assert", tuple(parts), judge)


class _Object:
    """What the parent sees of a value that is not built-in data: equal to nothing, not even itself,
    and with no truth value, so `assert f(x)` cannot pass on an object either."""
    __hash__ = object.__hash__

    def __eq__(self, other):
        return False

    def __bool__(self):
        raise TypeError("the output is not built-in data (the program's own class?)")

    def __repr__(self):
        return "<object>"


_BUILTIN_TYPES = {t.__name__: t for t in (bool, int, float, complex, str, bytes, list, tuple, dict, set,
                                          frozenset, type(None))}


def _decode(x):
    tag = x[0]
    if tag in ("N", "B"):
        return None if tag == "N" else bool(x[1])
    if tag == "i":
        return int(x[1], 16)
    if tag == "f":
        return float.fromhex(x[1])
    if tag == "c":
        return complex(float.fromhex(x[1]), float.fromhex(x[2]))
    if tag in ("s", "b") and type(x[1]) is (str if tag == "s" else bytes):
        return x[1]
    if tag == "d":
        return {_decode(k): _decode(v) for k, v in x[1]}
    if tag in ("l", "t", "S", "F"):
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](_decode(i) for i in x[1])
    if tag == "T" and x[1] in _BUILTIN_TYPES:
        return _BUILTIN_TYPES[x[1]]
    if tag == "o":
        return _Object()
    raise ValueError("malformed value")


class _PartFailed(Exception):
    pass


class _Parts(dict):
    """The judge's local names: a part is decoded when the judge reads it, and a part that raised in the
    child raises here, at the same point, so `f(1) == 2 or g(1)` passes without g, as in Python."""
    def __getitem__(self, name):
        ok, value, _ = dict.__getitem__(self, name)
        if not ok:
            raise _PartFailed(str(value))
        return _decode(value)


def _verdicts(plans, claims: dict) -> list:
    """[ok, output] per test, in order, up to the first test the child never answered. `claims` maps
    (test, part) to the child's first line about it."""
    results = []
    for t, (kind, parts, judge) in enumerate(plans):
        if kind == "stmt":
            if (t, -1) not in claims:
                break
            ok, error, _ = claims[t, -1]
            results.append([ok, "" if ok else str(error)])
            continue
        lines = [claims.get((t, p)) for p in range(len(parts))]
        if None in lines:
            break
        shown = str(lines[0][2]) if lines and lines[0][0] else ""
        if kind == "value":
            results.append([lines[0][0], shown or str(lines[0][1])])
            continue
        try:
            values = _Parts({f"_part{p}": c for p, c in enumerate(lines)})
            results.append([bool(eval(judge, {"__builtins__": builtins, **JUDGE_MODULES}, values)), shown])
        except _PartFailed as e:
            results.append([False, str(e)])
        except Exception as e:      # a malformed claim, or the assert raising, as a failing assert would
            described = "assertion failed" if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
            results.append([False, shown or described[:200]])
    return results


# --- isolation ------------------------------------------------------------------------------------------

USE_ISOLATION = True             # False: never isolate (bench/verifiers.py measures both ways)
_ISOLATION = None                # (available, line) once probed


def _bwrap_command(folder: str) -> list[str]:
    """bwrap's arguments, `folder` becoming /sandbox. The parents of the Python installation are made
    traversable (0755): a Python under /root must be readable by the user nobody the child becomes."""
    command = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
               "--die-with-parent", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):                 # merged /usr: /lib -> usr/lib
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(sys.executable),
                                           os.path.dirname(os.path.realpath(sys.executable)))}
    made = set()
    for root in sorted(r for r in roots if not r.startswith(("/usr/", "/bin/", "/lib/", "/lib64/"))):
        for parent in reversed(Path(root).parents[:-1]):       # all but "/", outermost first
            if str(parent) not in made:
                command += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        command += ["--ro-bind", root, root]
    return command + ["--proc", "/proc", "--dev", "/dev", "--bind", folder, "/sandbox", "--chdir", "/sandbox",
                      "--"]


def isolation() -> tuple[bool, str]:
    """(whether programs run isolated, one line saying so or why not). Probed once per process by
    running a trivial program the way every program will run."""
    global _ISOLATION
    if _ISOLATION is None:
        why = None
        if not sys.platform.startswith("linux"):
            why = f"this is {sys.platform}, and isolation needs Linux namespaces"
        elif shutil.which("bwrap") is None:
            why = "bubblewrap is not installed (Debian/Ubuntu: apt install bubblewrap)"
        else:
            with tempfile.TemporaryDirectory(prefix="rrr-sandbox-") as folder:
                os.chmod(folder, 0o755)
                try:
                    command = _bwrap_command(folder) + [sys.executable, "-I", "-S", "-c", "print(1 + 1)"]
                    probe = subprocess.run(command, capture_output=True, text=True, timeout=30)
                    if probe.stdout.strip() != "2":
                        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
                        why = f"bwrap cannot create the namespaces here ({last})"
                except (OSError, subprocess.TimeoutExpired) as e:
                    why = f"bwrap cannot run here ({e})"
        _ISOLATION = (why is None, "code sandbox: isolated by bubblewrap (no network, own PID namespace, "
                      "only the Python installation and its own folder visible)" if why is None else
                      f"code sandbox: NOT isolated, {why}: programs run with process limits only")
    return _ISOLATION


# --- running programs -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _child_source() -> str:
    # Sent as text: with isolation, the project's files are not in the child's view. The child's
    # arguments are the report descriptor and this process's id (which says, in `ps`, who started it).
    return Path(__file__).with_name("sandbox_child.py").read_text()


def _kill_session(sid: int, patience: float = 2.0):
    """SIGKILL the process group and any process still in the session (a child that changed group), then
    wait (up to `patience` seconds) until none of them is left but zombies: a killed process can take a
    moment to exit (freeing a large allocation), and a caller that returns before that leaves it
    visible and holding memory."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + patience
    while (members := _session_members(sid)) and time.monotonic() < deadline:
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.01)


def _session_members(sid: int) -> list[int]:
    """Processes of session `sid` that have not exited yet (zombies aside), from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] not in ("Z", "X"):   # state, then field 6 (session)
                members.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return members


def _read_report(read_end: int, deadline: float) -> tuple:
    """(claims, failure, started, done, timed_out) from the child's lines, each read as a Python literal
    or skipped. `claims` maps (test, part) to the first line about it: a later one does not overwrite it."""
    claims, failure, started, done = {}, None, False, False
    buffer, size = b"", 0
    with selectors.DefaultSelector() as sel:
        sel.register(read_end, selectors.EVENT_READ)
        while not done:
            left = deadline - time.monotonic()
            if left <= 0:
                return claims, failure, started, done, True
            if not sel.select(left):
                continue
            chunk = os.read(read_end, 65536)
            size += len(chunk)
            if not chunk or size > RESULT_LIMIT:
                break       # every writer is gone, or too much came back
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                try:
                    row = ast.literal_eval(line.decode("utf-8", "replace"))
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, SystemError):
                    continue
                if not isinstance(row, tuple):
                    continue
                if row == ("started",):
                    started = True
                elif row == ("end",):
                    done = True
                elif len(row) == 2 and row[0] == "failure" and failure is None:
                    failure, done = str(row[1]), True
                elif len(row) == 5 and type(row[0]) is int and type(row[1]) is int and type(row[2]) is bool:
                    claims.setdefault((row[0], row[1]), row[2:])
    return claims, failure, started, done, False


def run_program(completion: str, tests, setup: str, timeout: float, mode: str) -> dict:
    """Runs one program in the sandbox. Returns {"done": bool, "results": [[ok, output], ...],
    "failure": str | None, "timed_out": bool, "infra": None}; results stop at the first test the child
    never answered. Raises OSError when no pipe, folder or process can be had; "infra" says why when the
    process started but never reached the program (see run_batch)."""
    program = extract_program(completion)
    names = _names_bound(program) | _names_bound(setup)
    plans = [_plan(t, mode, names) for t in tests]
    job = marshal.dumps(dict(program=program, setup=setup, tests=[(kind, parts) for kind, parts, _ in plans],
                             memory=MEMORY_LIMIT, file_size=FILE_LIMIT, cpu=int(timeout) + 1,
                             value_limit=VALUE_LIMIT, blocked=BLOCKED_MODULES, preload=PRELOADED_MODULES,
                             nobody=NOBODY))
    isolated = USE_ISOLATION and isolation()[0]
    read_end, write_end = os.pipe()
    with tempfile.TemporaryDirectory(prefix="rrr-sandbox-") as folder:
        if os.getuid() == 0:
            os.chown(folder, NOBODY, NOBODY)      # the child runs as nobody (see sandbox_child.py)
        home = "/sandbox" if isolated else folder
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LC_ALL": "C.UTF-8"}
        try:
            command = [sys.executable, "-I", "-S", "-c", _child_source(), str(write_end), str(os.getpid())]
            proc = subprocess.Popen((_bwrap_command(folder) if isolated else []) + command, cwd=folder,
                                    env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, pass_fds=(write_end,), start_new_session=True)
        except OSError:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        try:
            deadline = time.monotonic() + timeout
            try:
                proc.stdin.write(job)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            claims, failure, started, done, timed_out = _read_report(read_end, deadline)
        finally:
            _kill_session(proc.pid)
            proc.wait()
            os.close(read_end)
    if not started:     # written before the program runs: nothing the program does can unwrite it
        return _not_run(f"the sandbox's process did not start within {timeout:g} s" if timed_out else
                        f"the sandbox's process exited with status {proc.returncode} before the program ran")
    # A failure (the program raising before the tests) ends the report: done, and no test passes.
    results = _verdicts(plans, claims) if failure is None else [[False, failure]] * len(tests)
    return dict(done=done and len(results) == len(tests), results=results, failure=failure,
                timed_out=timed_out, infra=None)


def _not_run(why: str) -> dict:
    return dict(done=False, results=[], failure=None, timed_out=False, infra=why)


def _run_or_not(item, timeout, mode) -> dict:
    try:
        return run_program(*item, timeout, mode)
    except OSError as e:        # out of processes, memory, file descriptors or disk
        return _not_run(f"the sandbox could not start a process ({e})")


def run_batch(items, workers, timeout, mode) -> list[tuple[list, dict]]:
    """items: (completion, tests, setup); mode "check" (run the asserts) or "outputs" (evaluate what
    each test's left-hand side computes). Returns (tests, run_program's result) per item, in order.

    A program that could not be run for reasons outside it (no process, bwrap refusing, a process that
    never reached the program) is tried once more; if it fails again, its result's "infra" says why,
    and its results say nothing about the program."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    items = [(c if isinstance(c, str) else str(c), list(t), s or "") for c, t, s in items]
    workers = max(1, min(workers or local_share_of_cores(), len(items) or 1))
    with ThreadPoolExecutor(workers) as pool:
        runs = list(pool.map(lambda item: _run_or_not(item, timeout, mode), items))
        again = [i for i, run in enumerate(runs) if run["infra"]]     # a shortage that may have passed
        for i, run in zip(again, pool.map(lambda i: _run_or_not(items[i], timeout, mode), again)):
            runs[i] = run
    return [(item[1], run) for item, run in zip(items, runs)]
