"""Countdown: combine the given numbers with + - * / (each exactly once) to reach the target.

reference: {"nums": [int, ...], "target": int}. Real rows: TinyZero's Countdown-Tasks-3to4 as JSON Lines
(or parquet, with pyarrow), kept in file order because that data set was generated at random. Offline:
puzzles generated here like that data set: 3 or 4 numbers in 1..99, a target in 10..100, and only
puzzles the solver below can solve.

`countdown_easy` is an easier tier, always generated (no data set has it): 3 numbers in 1..20, a target
in 10..100. It exists so that a small model can be given partial skill on CPU (warmstart.py) and learning
can be measured there (bench/learning.py); it is not the paper's task.

Both tasks also have a `dev` split, for choosing settings without looking at the test split: generated
puzzles that no test puzzle and no train puzzle of any seed can be (generate_split says how), the same for
every run. With --data-dir there is no dev file: the dev split is still generated, less the puzzles that
are in the real train or test file.
"""

import random
import zlib
from functools import partial

from data.common import REFLECT_ANSWER, DataError, Example, Task, check_fields, read_jsonl_lines
from verifiers import Verdict, check_countdown

OFFLINE_SIZE = {"train": 2000, "test": 500, "dev": 500}   # generated when no size is asked for
TEST_SEED = 0                                 # offline test and dev puzzles are the same for every run
FORMAT = ("Think it through first, then write only the final equation between <answer> and </answer>, "
          "for example <answer> (1 + 2) / 3 </answer>.")
# test_max and dev_max: the most puzzles the generated test and dev splits hold; the dev split starts where
# the test split's maximum ends (generate_split); a split's default size is at most its maximum. countdown:
# 1024 is the largest --eval-size any countdown recipe asks (the real test file's size). countdown_easy has
# only 1249 solvable test-bucket puzzles in all, and the stream slows down as it nears the last of them
# (1000 puzzles take 2.7 s, 1200 take 6.4 s; 1024 would leave 225 for dev, to be drawn to the very last),
# so its test split stops at 700 (bench/learning.py scores 300) and dev at 300.
TIERS = {"countdown": dict(counts=(3, 4), largest=99, test_max=1024, dev_max=1000),
         "countdown_easy": dict(counts=(3,), largest=20, test_max=700, dev_max=300)}


def prompt(nums, target) -> list[dict]:
    return [{"role": "user", "content": f"Use the numbers {list(nums)} to write an equation whose value is "
             f"{target}. You may use +, -, * and / and parentheses, and every number must be used exactly "
             f"once. {FORMAT}"}]


def verify(completion: str, example: Example) -> Verdict:
    return check_countdown(completion, example.reference["nums"], example.reference["target"])


# --- solver ----------------------------------------------------------------------------------------

def solve_countdown(nums, target) -> str | None:
    """An equation that uses each number once and equals `target` exactly, or None when there is none.

    Depth-first search: pick any two values, replace them by a result of + - * / (both orders for - and
    /), and recurse until one value is left. Values are exact fractions kept as (numerator, denominator)
    pairs of ints, never reduced, and compared by cross-multiplying: exact and much cheaper than
    fractions.Fraction, which matters because most random puzzles are unsolvable and need the full search.
    """
    tree = _search([(int(n), 1, int(n)) for n in nums], int(target))
    return None if tree is None else _format(tree, top=True)


def _search(items, t):
    # items: (p, q, tree) with value p / q, q != 0; a tree is an int or (op, left, right).
    if len(items) == 1:
        p, q, tree = items[0]
        return tree if p == t * q else None
    if len(items) == 2:
        # The last step is checked directly rather than by building six one-item lists.
        (pa, qa, ta), (pb, qb, tb) = items
        if pa * qb + pb * qa == t * qa * qb:
            return "+", ta, tb
        if pa * pb == t * qa * qb:
            return "*", ta, tb
        if pa * qb - pb * qa == t * qa * qb:
            return "-", ta, tb
        if pb * qa - pa * qb == t * qa * qb:
            return "-", tb, ta
        if pb and pa * qb == t * qa * pb:
            return "/", ta, tb
        if pa and pb * qa == t * qb * pa:
            return "/", tb, ta
        return None
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (pa, qa, ta), (pb, qb, tb) = items[i], items[j]
            rest = items[:i] + items[i + 1:j] + items[j + 1:]
            options = [(pa * qb + pb * qa, qa * qb, ("+", ta, tb)), (pa * pb, qa * qb, ("*", ta, tb)),
                       (pa * qb - pb * qa, qa * qb, ("-", ta, tb)),
                       (pb * qa - pa * qb, qa * qb, ("-", tb, ta))]
            if pb:
                options.append((pa * qb, qa * pb, ("/", ta, tb)))
            if pa:
                options.append((pb * qa, qb * pa, ("/", tb, ta)))
            for option in options:
                found = _search(rest + [option], t)
                if found is not None:
                    return found
    return None


def _format(tree, top=False) -> str:
    # Every inner operation is parenthesised, so the text evaluates exactly as the tree does.
    if isinstance(tree, int):
        return str(tree)
    text = f"{_format(tree[1])} {tree[0]} {_format(tree[2])}"
    return text if top else f"({text})"


# --- generator -------------------------------------------------------------------------------------

def check_warm_start(task_name: str, puzzles: int, reflections: bool = False):
    """One line, before a run writes anything, for a labelled warm start (warmstart.py) that cannot be made:
    it needs a task whose puzzles the solver answers (and --warm-start-reflections needs a warm start)."""
    if puzzles and task_name not in TIERS:
        raise DataError(f"--warm-start needs a task with a solver ({', '.join(TIERS)}), not {task_name}")
    if reflections and not puzzles:
        raise DataError("--warm-start-reflections needs --warm-start N (the labelled puzzles)")


def generate_puzzles(n: int, split: str, seed: int, tier: str = "countdown") -> list[tuple[list[int], int]]:
    """n distinct solvable puzzles of `split`. As in the Stream-of-Search generator that the data set's
    statistics match: draw the count and the target first, then redraw the numbers until the puzzle is
    solvable, which keeps the counts half and half and the targets uniform."""
    counts, largest = TIERS[tier]["counts"], TIERS[tier]["largest"]
    rng = random.Random(f"{tier}/{split}/{seed}")
    puzzles, seen = [], set()
    while len(puzzles) < n:
        count, target = rng.choice(counts), rng.randint(10, 100)
        while True:
            nums = [rng.randint(1, largest) for _ in range(count)]
            # One puzzle in ten, by a hash of its sorted numbers and target, is a test (or dev) puzzle, so a
            # generated train set never contains one, whatever the seeds and sizes.
            in_test = zlib.crc32(repr((sorted(nums), target)).encode()) % 10 == 0
            if in_test == (split == "test") and solve_countdown(nums, target) is not None:
                break
        key = (tuple(sorted(nums)), target)
        if key not in seen:
            seen.add(key)
            puzzles.append((nums, target))
    return puzzles


def generate_split(split: str, size: int | None, seed: int, tier: str = "countdown",
                   leave_out=frozenset()) -> list[tuple[int, list[int], int]]:
    """(position, nums, target) of the first `size` puzzles of a generated split. Train draws from the nine
    train buckets under `seed`. Test and dev are one stream, the test bucket's under TEST_SEED: test is its
    first test_max puzzles at most and dev the ones after those, so that no dev puzzle is a test puzzle of
    any size. Puzzles in `leave_out` ((sorted nums, target) pairs) are passed over, and more drawn in their
    place; a position counts from the split's start, passed-over puzzles included."""
    if split == "train":
        return [(i, nums, target) for i, (nums, target) in
                enumerate(generate_puzzles(OFFLINE_SIZE[split] if size is None else size, split, seed, tier))]
    most = TIERS[tier][f"{split}_max"]
    size = min(OFFLINE_SIZE[split], most) if size is None else size
    if size > most:
        raise DataError(f"the generated {tier} {split} split has {most} puzzles at most, not {size}")
    start = 0 if split == "test" else TIERS[tier]["test_max"]
    # With puzzles to pass over, a margin from the start: the real files hold a few dev puzzles (3 of the
    # first 1000), and drawing the stream again would double the time.
    extra = size // 20 if leave_out else 0
    while True:       # draw more when some are passed over, from the same stream (a longer prefix of it)
        drawn = generate_puzzles(start + size + extra, "test", TEST_SEED, tier)[start:]
        kept = [(i, nums, target) for i, (nums, target) in enumerate(drawn)
                if (tuple(sorted(nums)), target) not in leave_out]
        if len(kept) >= size:
            return kept[:size]
        extra += size - len(kept)


# --- loading ---------------------------------------------------------------------------------------

def load(split, data_dir, seed, size, tier="countdown") -> list[Example]:
    real = data_dir is not None and tier == "countdown"
    if real and split != "dev":
        return read_rows(split, data_dir)
    # The real files were not made with our hash buckets: a generated dev puzzle may be one of their rows.
    leave_out = {(tuple(sorted(ex.reference["nums"])), ex.reference["target"])
                 for other in ("train", "test") for ex in read_rows(other, data_dir)} if real else frozenset()
    seed = seed if split == "train" else TEST_SEED
    # Test ids keep the "-s0" they have always had; dev ids name no seed, dev having none to vary.
    name = f"{tier}-gen-dev" if split == "dev" else f"{tier}-gen-{split}-s{seed}"
    return [Example(f"{name}-{i}", prompt(nums, target), dict(nums=nums, target=target))
            for i, nums, target in generate_split(split, size, seed, tier, leave_out)]


def read_rows(split, data_dir) -> list[Example]:
    """A split of the real data set: TinyZero's rows, in file order."""
    jsonl = data_dir / "countdown" / f"countdown_3to4_{split}.jsonl"
    parquet = jsonl.with_suffix(".parquet")
    if jsonl.exists() or not parquet.exists():
        rows = [(f"{jsonl} line {n}", row) for n, row in read_jsonl_lines(jsonl)]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{parquet}: reading parquet needs pyarrow (pip install pyarrow); "
                            f"or convert the file to JSON Lines ({jsonl.name})") from None
        rows = [(f"{parquet} row {n}", row) for n, row in enumerate(pq.read_table(parquet).to_pylist())]
    examples = []
    for n, (where, row) in enumerate(rows):
        check_fields(row, ("target", "nums"), where)
        nums, target = row["nums"], row["target"]
        if not (isinstance(nums, list) and nums and all(type(x) is int for x in nums)
                and type(target) is int):
            raise DataError(f"{where}: 'nums' must be a list of integers and 'target' an integer")
        # TinyZero rows carry their row number in the full data set; it keeps ids stable across subsets.
        examples.append(Example(f"countdown-{split}-{row.get('hf_row', n)}", prompt(nums, target),
                                dict(nums=list(nums), target=target)))
    return examples


TASK = Task("countdown", REFLECT_ANSWER, FORMAT, loader=load, verifier=verify,
            splits=("train", "test", "dev"), shuffle=False)
EASY_TASK = Task("countdown_easy", REFLECT_ANSWER, FORMAT, loader=partial(load, tier="countdown_easy"),
                 verifier=verify, splits=("train", "test", "dev"), shuffle=False)
