"""Countdown: combine the given numbers with + - * / (each exactly once) to reach the target.

reference: {"nums": [int, ...], "target": int}. Real rows: TinyZero's Countdown-Tasks-3to4 JSONL (or
parquet, with pyarrow). Offline: puzzles generated here with a seed, like that data set: 3 or 4 numbers
in 1..99, target in 10..100, kept only when the solver below finds an equation.
"""

import random
import zlib
from fractions import Fraction

from data import REFLECT_ANSWER, DataError, Example, Task, check_fields, read_jsonl, user

OFFLINE_SIZE = {"train": 2000, "test": 500}   # when no size is asked for


def prompt(nums, target) -> list[dict]:
    return user(f"Use the numbers {list(nums)} to write an equation whose value is {target}. You may use "
                f"+, -, * and / and parentheses, and every number must be used exactly once. Think it "
                f"through first, then write only the final equation between <answer> and </answer>, "
                f"for example <answer> (1 + 2) / 3 </answer>.")


def solve_countdown(nums, target) -> str | None:
    """An equation that uses each number once and equals target exactly, or None when there is none.
    Depth-first over pairs with every operation; floats prune, the found tree is checked exactly."""
    tree = _search(tuple((float(n), n) for n in nums), float(target), Fraction(target))
    return None if tree is None else _format(tree, top=True)


def _search(items, target, exact):
    # items: (float value, tree) pairs; a tree is an int or (op, left, right).
    if len(items) == 1:
        value, tree = items[0]
        return tree if abs(value - target) < 1e-9 and _exact(tree) == exact else None
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (a, ta), (b, tb) = items[i], items[j]
            rest = items[:i] + items[i + 1:j] + items[j + 1:]
            options = [(a + b, ("+", ta, tb)), (a * b, ("*", ta, tb)), (a - b, ("-", ta, tb)), (b - a, ("-", tb, ta))]
            if b:
                options.append((a / b, ("/", ta, tb)))
            if a:
                options.append((b / a, ("/", tb, ta)))
            for option in options:
                found = _search(rest + (option,), target, exact)
                if found is not None:
                    return found
    return None


def _exact(tree) -> Fraction | None:
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = _exact(left), _exact(right)
    if a is None or b is None or (op == "/" and b == 0):
        return None
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]


def _format(tree, top=False) -> str:
    if isinstance(tree, int):
        return str(tree)
    text = f"{_format(tree[1])} {tree[0]} {_format(tree[2])}"
    return text if top else f"({text})"


def generate_puzzles(n: int, split: str, seed: int) -> list[tuple[list[int], int]]:
    """n solvable puzzles of `split`. A puzzle belongs to the test split when a hash of it falls in
    one tenth of the range, so train and test never share a puzzle whatever the seeds and sizes."""
    rng = random.Random(f"countdown/{split}/{seed}")
    puzzles, seen = [], set()
    while len(puzzles) < n:
        nums = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        target = rng.randint(10, 100)
        key = (tuple(nums), target)
        if key in seen or (zlib.crc32(repr(key).encode()) % 10 == 0) != (split == "test"):
            continue
        seen.add(key)
        if solve_countdown(nums, target) is not None:
            puzzles.append((nums, target))
    return puzzles


def load(split, data_dir, seed, size) -> list[Example]:
    if data_dir is None:
        # Test puzzles do not depend on the run's seed, so every run is scored on the same ones.
        seed = seed if split == "train" else 0
        return [Example(f"countdown-{split}{seed}-{i}", prompt(nums, target), dict(nums=nums, target=target))
                for i, (nums, target) in enumerate(generate_puzzles(size or OFFLINE_SIZE[split], split, seed))]
    base = data_dir / "countdown"
    jsonl, parquet = base / f"countdown_3to4_{split}.jsonl", base / f"countdown_3to4_{split}.parquet"
    if jsonl.exists() or not parquet.exists():
        rows = read_jsonl(jsonl, required=("target", "nums"))
        where = [f"{jsonl} line {n}" for n in range(1, len(rows) + 1)]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{parquet}: reading parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") from None
        rows = pq.read_table(parquet).to_pylist()
        where = [f"{parquet} row {n}" for n in range(len(rows))]
    examples = []
    for n, (row, at) in enumerate(zip(rows, where)):
        check_fields(row, ("target", "nums"), at)
        nums, target = row["nums"], row["target"]
        if not (isinstance(nums, list) and nums and all(isinstance(x, int) for x in nums) and isinstance(target, int)):
            raise DataError(f"{at}: 'nums' must be a list of integers and 'target' an integer")
        examples.append(Example(f"countdown-{split}-{row.get('hf_row', n)}", prompt(nums, target),
                                dict(nums=list(nums), target=target)))
    return examples


def check(completion, example):
    from verifiers import check_countdown
    return check_countdown(completion, example.reference["nums"], example.reference["target"])


TASK = Task("countdown", reflection_prompt=REFLECT_ANSWER,
            retry_prompt="Try the task again, using your reflection. Think it through, then write only the final "
                         "equation between <answer> and </answer>.",
            answer_format="Think it through, then write only the final equation between <answer> and </answer>.",
            loader=load, checker=check)
