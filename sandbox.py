"""A fresh, limited process per program: what verifiers.check_code runs MBPP-style programs in.

NOT a security boundary. Each program runs in its own process and session, as user nobody when
started as root, with limits on memory, CPU time, file size, open files and processes (so fork
fails), in a fresh temporary folder outside which it cannot write, with stdout and stderr sent to
/dev/null, and with destructive functions (deleting or renaming files, os.system, fork, kill,
subprocess, ctypes, ...) disabled before it starts. A wall-clock timeout kills the whole process group
and any process left in the session. That stops accidents and the reward hacks a policy model
stumbles on: exiting early, printing a fake success, objects whose __eq__ always says True, forking,
sleeping past the timeout, flooding the output. It does not stop a program written to escape (one
that digs the runner's secret out of its memory, say). Run untrusted code in a container or a VM.

    run_batch(items, workers, timeout, mode) -> [{"done", "results", "failure", "timed_out"}, ...]
"""

import ast
import functools
import inspect
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
from concurrent.futures import ThreadPoolExecutor

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


def run_program(completion: str, tests, setup: str, timeout: float, mode: str) -> dict:
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


def local_share_of_cores() -> int:
    """This process's share of the machine's cores, the default number of programs run at once (and
    of torch threads on CPU). torchrun starts LOCAL_WORLD_SIZE ranks on a node, each checking its
    own part of a batch; every rank taking all the cores would oversubscribe the node 8x on 8 GPUs
    and turn correct programs into timeouts."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def run_batch(items, workers, timeout, mode) -> list[tuple[list, dict]]:
    """items: (completion, tests, setup); mode "check" (run the asserts) or "outputs" (evaluate what
    each test's left-hand side computes). Returns (tests, run_program's result) per item, in order."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    items = [(c if isinstance(c, str) else str(c), list(t), s or "") for c, t, s in items]
    workers = max(1, min(workers or local_share_of_cores(), len(items) or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda item: (item[1], run_program(*item, timeout, mode)), items))
