"""What runs inside the sandbox's process (sandbox.py sends this file's text to `python -I -S -c`).

It reads the job from stdin, limits itself, disables destructive functions, runs the program and writes
one line per part of each test on the report descriptor: ("started",) just before the program runs, then
(test, part, True, value, shown) or (test, part, False, error, ""), then ("end",). It never sees an
expected value and decides nothing: sandbox.py compares. Standard library only, and as little of it as
possible: start-up time is most of the cost of a check.
"""


def main():
    import builtins
    import io
    import marshal
    import os
    import resource
    import sys
    job = marshal.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    report = int(sys.argv[1])
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
    # Private references, taken before the program can replace builtins: an honest program that
    # rebinds `repr` or `isinstance` must not change what is reported.
    _type, _repr, _isinstance, _len, _eval, _exec, _compile = type, repr, isinstance, len, eval, exec, compile
    _BaseException, _AssertionError, _exit, _write = BaseException, AssertionError, os._exit, os.write
    _realpath, _hex, _join_bytes, _str_of = os.path.realpath, int.__format__, b"".join, str.__str__
    _complex_parts = complex.__getnewargs__
    builtin_types = (bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, type(None))

    def encode(x, depth=0):
        """x as tagged built-in data the parent can read with ast.literal_eval, through the built-in
        types' own methods; anything else (the program's classes, iterators, ...) is ("o",)."""
        if depth > 20:
            return ("o",)
        if x is None or x is True or x is False:
            return ("N",) if x is None else ("B", x is True)
        if _isinstance(x, int):
            return ("i", _hex(x, "x"))        # hex: no limit on digits, unlike str(int)
        if _isinstance(x, float):
            return ("f", float.hex(x))
        if _isinstance(x, complex):
            return ("c",) + tuple(float.hex(p) for p in _complex_parts(x))
        if _isinstance(x, str):
            return ("s", _str_of(x))
        if _isinstance(x, bytes):
            return ("b", _join_bytes((x,)))
        if _isinstance(x, dict):
            return ("d", [(encode(k, depth + 1), encode(v, depth + 1)) for k, v in dict.items(x)])
        for base, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F")):
            if _isinstance(x, base):
                return (tag, [encode(i, depth + 1) for i in base.__iter__(x)])
        for builtin_type in builtin_types:      # `assert type(f(x)) == int`
            if x is builtin_type:
                return ("T", builtin_type.__name__)
        return ("o",)

    def describe(e):
        return "assertion failed" if _isinstance(e, _AssertionError) else f"{_type(e).__name__}: {e}"[:200]

    def send(row):
        _write(report, (_repr(row) + "\n").encode("utf-8", "replace"))

    for module, names in ((os, ("system", "popen", "kill", "killpg", "fork", "forkpty", "setsid", "setpgid",
                                "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
                                "truncate", "chmod", "chown", "lchown", "putenv", "unsetenv", "execv",
                                "execve", "execvp", "spawnv", "spawnve", "posix_spawn", "posix_spawnp",
                                "chdir", "chroot", "link", "symlink", "mkfifo", "_exit", "abort")),
                          (resource, ("setrlimit", "prlimit")),
                          (builtins, ("exit", "quit", "help", "input"))):
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
        full = _realpath(path if _isinstance(path, (str, bytes)) else str(path))
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
    send(("started",))      # before the program runs: without it, the machinery failed, not the program
    try:
        _exec(_compile(job["program"], "solution.py", "exec"), namespace)
        _exec(_compile(job["setup"], "setup.py", "exec"), namespace)  # MBPP's setup may use its classes
    except SyntaxError as e:
        send(("failure", f"SyntaxError: {e.msg} (line {e.lineno})"))
        _exit(0)
    except _BaseException as e:   # SystemExit included: exiting is not passing
        send(("failure", describe(e)))
        _exit(0)
    for t, (kind, parts) in enumerate(job["tests"]):
        if kind == "stmt":
            try:
                _exec(parts[0], namespace)
                send((t, -1, True, None, ""))
            except _BaseException as e:
                send((t, -1, False, describe(e), ""))
            continue
        for p, source in enumerate(parts):
            try:
                value = _eval(source, namespace)
                try:
                    shown = _repr(value)[:200]
                except _BaseException:         # a huge int, or the program's own __repr__ failing
                    shown = f"<{_type(value).__name__}>"
                line = _repr((t, p, True, encode(value), shown)) + "\n"
                if _len(line) > job["value_limit"]:
                    too_large = f"the output is larger than {job['value_limit']} bytes"
                    line = _repr((t, p, False, too_large, shown)) + "\n"
                _write(report, line.encode("utf-8", "replace"))
            except _BaseException as e:     # reported, and raised where the parent's judge uses it
                send((t, p, False, describe(e), ""))
    send(("end",))
    _exit(0)


if __name__ == "__main__":
    main()
