"""What every task module shares: the Example and Task types, the paper's reflection prompts, and the
readers of data files that name the file and line of a bad row. Imports no task module, so that the task
modules and data/__init__.py (which imports them all) form no cycle."""

import bisect
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runs import BadInput
from verifiers import stop_if_unjudged

SAMPLES = Path(__file__).resolve().parent / "samples"

# The RRR paper's reflection prompts, verbatim.
REFLECT_TOOL = ("You tried performing the task, but failed in generating the correct tool call. Reflect on "
                "what went wrong and write a short explanation that will help you do better next time.")
REFLECT_ANSWER = ("You tried solving the problem and got the wrong answer. Reflect on what went wrong and "
                  "write a short explanation that will help you do better next time.")


class DataError(BadInput):
    """A missing or malformed data file; the message names the file (and line)."""


@dataclass
class Example:
    id: str                  # stable across runs, e.g. "mbpp-601", "bfcl-simple_python_3"
    messages: list[dict]     # the task prompt as chat messages (a system message, then the user's turn)
    reference: dict          # what the verifier needs (see each task module)


@dataclass(frozen=True)
class Task:
    name: str
    reflection_prompt: str                          # the RRR paper's, verbatim
    answer_format: str                              # how every prompt asks for the answer
    loader: Callable = field(repr=False)            # (split, data_dir, seed, size) -> examples in file order
    verifier: Callable = field(repr=False)          # (completion, example) -> Verdict
    batch_verifier: Callable | None = field(default=None, repr=False)   # the same for lists, where faster
    splits: tuple = ("train", "test")
    shuffle: bool = True                            # False where the source is already in random order
    retry_noun: str = "task"

    @property
    def retry_prompt(self) -> str:
        return f"Now try the {self.retry_noun} again, using your reflection. {self.answer_format}"

    def load(self, split: str, data_dir=None, size: int | None = None, seed: int = 0) -> list[Example]:
        if split not in self.splits:
            raise DataError(f"task {self.name} has splits {', '.join(self.splits)}, not {split!r}")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise DataError(f"size must be a non-negative integer or None, not {size!r}")
        examples = self.loader(split, Path(data_dir) if data_dir else None, seed, size)
        seen = set()
        for ex in examples:
            if ex.id in seen:
                raise DataError(f"task {self.name}, split {split}: duplicate example id {ex.id!r}")
            seen.add(ex.id)
        if self.shuffle:
            random.Random(f"{self.name}/{split}/{seed if split == 'train' else 0}").shuffle(examples)
        return examples if size is None else examples[:size]

    def check(self, completion: str, example: Example):
        return self.verifier(completion, example)

    def check_batch(self, completions: list[str], examples: list[Example]) -> list:
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        if self.batch_verifier is not None:
            return stop_if_unjudged(self.batch_verifier(completions, examples))
        return stop_if_unjudged([self.verifier(c, ex) for c, ex in zip(completions, examples)])


def check_fields(row, required: tuple, where: str):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in required:
        if name not in row:
            raise DataError(f"{where}: missing field {name!r}")


def read_jsonl_lines(path: Path, required: tuple = ()) -> list[tuple[int, dict]]:
    """(line number, row) for each row of a JSON Lines file (blank lines skipped)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            check_fields(row, required, f"{path} line {n}")
            rows.append((n, row))
    return rows


SPACE = re.compile(r"[ \t\r\n]*")      # JSON's whitespace


def read_json_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, row) for each element of a file holding one JSON list. The elements are decoded
    one at a time so that an error, or a row that fails a later check, can name its line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    decoder, rows = json.JSONDecoder(), []
    newlines = [m.start() for m in re.finditer("\n", text)]        # a count per row would be quadratic
    line_of = lambda pos: bisect.bisect_left(newlines, pos) + 1  # noqa: E731
    pos = SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise DataError(f"{path} line {line_of(pos)}: expected a JSON list of rows")
    pos = SPACE.match(text, pos + 1).end()
    while not text.startswith("]", pos):
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        rows.append((line_of(pos), row))
        pos = SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = SPACE.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise DataError(f"{path} line {line_of(pos)}: expected ',' or ']' after a row")
    if text[pos + 1:].strip():
        raise DataError(f"{path} line {line_of(pos + 1)}: extra data after the list")
    return rows
