"""What rrr.py and rerest.py share outside the model: the command line (built from a dataclass of
flags, each with its help text), the run folder, JSON-lines logs, and the report (a markdown table
and a PNG plot written with numpy + zlib, so no plotting package is needed).
"""

import argparse
import dataclasses
import json
import math
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np


class BadInput(Exception):
    """Bad flags, a missing model or data, or a run folder in the way: one line and exit code 2."""


def flag(default, help: str, choices=None):
    """A dataclass field that becomes `--name` with this help text."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices))


def parse_config(cls, argv=None, description: str = ""):
    """Builds an argparse parser from the fields of dataclass `cls` and returns an instance. `--config
    FILE` reads flag values from a JSON object (keys are flag names; keys starting with "_" are notes);
    flags on the command line override it."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON object of flag values, e.g. a file in recipes/ "
                        "({\"steps\": 200, \"model\": \"Qwen/Qwen2.5-1.5B-Instruct\"}); flags given here override it")
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        meta, default = f.metadata, f.default
        kind = f.type if isinstance(f.type, str) else str(f.type)   # e.g. "<class 'int'>", "float | None"
        if "bool" in kind:      # --name and --no-name
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
            continue
        if "list" in kind:      # repeatable: --name a --name b
            parser.add_argument(name, action="append", default=None, choices=meta.get("choices"),
                                help=meta["help"] + " (repeatable)")
            continue
        convert = float if "float" in kind else int if "int" in kind else str
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(name, type=convert, default=default, choices=meta.get("choices"),
                            help=meta["help"] + shown, metavar=None if meta.get("choices") else f.name.upper())
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file = parser.parse_known_args(argv)[0].config
    if config_file:
        # The file's values become flags placed before the command line's, so that the latter win and
        # argparse checks both the same way.
        argv = config_flags(Path(config_file), cls) + argv
    values = vars(parser.parse_args(argv))
    values.pop("config")
    return cls(**values)


def config_flags(path: Path, cls) -> list[str]:
    """A --config file as command-line flags; unknown keys and values of the wrong kind are refused."""
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"--config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"--config {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise BadInput(f"--config {path}: must be a JSON object of flag values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flags = []
    for key, value in config.items():
        name = key.replace("-", "_")
        if key.startswith("_"):
            continue
        if name not in fields:
            raise BadInput(f"--config {path}: unknown flag {key!r}")
        kind = str(fields[name].type)
        if value is None:
            if fields[name].default is not None:
                raise BadInput(f"--config {path}: {key!r} cannot be null")
            continue
        if "list" in kind:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise BadInput(f"--config {path}: {key!r} must be a list of strings")
            flags += [x for v in value for x in (f"--{name.replace('_', '-')}", v)]
        elif "bool" in kind:
            if not isinstance(value, bool):
                raise BadInput(f"--config {path}: {key!r} must be true or false")
            flags.append(f"--{'' if value else 'no-'}{name.replace('_', '-')}")
        else:
            want = (int,) if "int" in kind else (int, float) if "float" in kind else (str,)
            if not isinstance(value, want) or isinstance(value, bool):
                raise BadInput(f"--config {path}: {key!r} must be {'an integer' if want == (int,) else 'a number' if int in want else 'a string'}")
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


# Flags that may change when a run is resumed; any other difference means it is another run.
RESUMABLE_CHANGES = {"steps", "eval_every", "save_every", "resume", "log_episodes", "device", "gradient_checkpointing"}


def prepare_out(out: Path, config: dict, resume: bool) -> dict | None:
    """Creates the run folder, or checks that --resume continues the same run. Returns the saved config
    of the run being resumed (None for a new run). Never deletes or overwrites anything."""
    saved_file = out / "config.json"
    if saved_file.exists():
        saved = json.loads(saved_file.read_text())
        if not resume:
            raise BadInput(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
        changed = sorted(k for k in set(saved) | set(config)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
        if changed:
            what = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise BadInput(f"--resume with other settings than the run in {out} ({what})")
        return saved
    if resume:
        raise BadInput(f"--resume: no run to continue in {out} (no config.json)")
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved_file, config)
    return None


def write_json(path: Path, obj):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
    """Runs `run()`; bad input ends with one line on stderr and exit code 2 (rank 0 prints it)."""
    from data import DataError
    from model import ModelError
    from parallel import SharedFolderError
    try:
        run(argv)
    except (BadInput, DataError, ModelError, SharedFolderError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# --- a dependency-free line plot --------------------------------------------------------------------

# 3x5 bitmap digits for axis labels: each glyph is 5 rows of 3 bits.
_GLYPHS = {"0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
           "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
           "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "%": "101001010100101"}
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _text(img, x, y, s, scale=2):
    for i, ch in enumerate(s):
        bits = _GLYPHS.get(ch)
        if bits is None:
            continue
        for k, b in enumerate(bits):
            if b == "1":
                r, c = divmod(k, 3)
                y0, x0 = y + r * scale, x + i * 4 * scale + c * scale
                img[y0:y0 + scale, x0:x0 + scale] = 0


def _line(img, x0, y0, x1, y1, color):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    for dx in (0, 1):
        for dy in (0, 1):
            img[np.clip(ys + dy, 0, img.shape[0] - 1), np.clip(xs + dx, 0, img.shape[1] - 1)] = color


def plot_panels(path: Path, panels: list[list[tuple[list, list]]], width=360, height=240):
    """Writes a PNG of side-by-side panels; each panel is a list of (xs, ys) series with y in [0, 1].
    Series colours follow COLORS in order; the y axis is labelled 0 and 1, the x axis with its range."""
    pad = 30
    img = np.full((height, width * len(panels), 3), 255, dtype=np.uint8)
    for p, series in enumerate(panels):
        left, right, top, bottom = p * width + pad, (p + 1) * width - 10, 10, height - pad
        xs_all = [x for xs, _ in series for x in xs] or [0, 1]
        lo, hi = min(xs_all), max(max(xs_all), min(xs_all) + 1)
        img[top:bottom, left] = 0
        img[bottom, left:right] = 0
        for frac in (0.25, 0.5, 0.75, 1.0):
            y = int(bottom - frac * (bottom - top))
            img[y, left + 1:right:4] = 190
        _text(img, left - 10, bottom - 5, "0")
        _text(img, left - 10, top, "1")
        _text(img, left, bottom + 8, str(lo))
        _text(img, right - 8 * len(str(hi)), bottom + 8, str(hi))
        for s, (xs, ys) in enumerate(series):
            pts = [(left + (x - lo) / (hi - lo) * (right - left), bottom - min(max(y, 0), 1) * (bottom - top))
                   for x, y in zip(xs, ys) if y is not None]
            color = COLORS[s % len(COLORS)]
            for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
                _line(img, xa, ya, xb, yb, color)
            for xa, ya in pts:
                img[int(ya) - 2:int(ya) + 3, int(xa) - 2:int(xa) + 3] = color
    _write_png(path, img)


def _write_png(path: Path, img: np.ndarray):
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))    # filter type 0 on every row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
