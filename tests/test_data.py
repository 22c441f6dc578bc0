"""The data package: the Countdown generator and solver, the loaders on the real files, the offline
samples against their own verifiers, Countdown's dev split, and the errors for bad input."""

import ast
import json
import sys
import zlib
from fractions import Fraction

import pytest
from tiny import shared_data_dir

from data import DataError, get_task, reflector_messages, resolve_data_dir
from data.countdown import generate_puzzles, solve_countdown

TASKS = ("countdown", "function_calling", "mbpp", "gsm8k")


def evaluate(equation: str):
    """Independent reference: (exact value, numbers used) of an equation of ints, + - * / and parentheses,
    walking Python's own parse tree with fractions."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}
    used = []

    def walk(node):
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise AssertionError(f"unexpected {ast.dump(node)} in {equation!r}")

    return walk(ast.parse(equation, mode="eval").body), sorted(used)


def assert_solves(nums, target):
    equation = solve_countdown(nums, target)
    assert equation is not None, (nums, target)
    value, used = evaluate(equation)
    assert value == target and used == sorted(nums), (equation, nums, target)


# --- Countdown generator and solver ----------------------------------------------------------------

def test_generated_puzzles_match_the_data_set_and_are_solvable():
    puzzles = generate_puzzles(150, "train", seed=0)
    assert all(len(nums) in (3, 4) and all(1 <= n <= 99 for n in nums) and 10 <= t <= 100 for nums, t in puzzles)
    sizes = [len(nums) for nums, _ in puzzles]
    assert 50 < sizes.count(3) < 100                       # about half and half, as in TinyZero's set
    assert len({(tuple(sorted(n)), t) for n, t in puzzles}) == 150
    for nums, target in puzzles:
        assert_solves(nums, target)


def test_generator_is_seeded_and_keeps_test_puzzles_out_of_train():
    assert generate_puzzles(40, "train", seed=3) == generate_puzzles(40, "train", seed=3)
    assert generate_puzzles(40, "train", seed=3) != generate_puzzles(40, "train", seed=4)
    key = lambda puzzles: {(tuple(sorted(n)), t) for n, t in puzzles}  # noqa: E731
    test = key(generate_puzzles(300, "test", seed=0))
    for seed in range(3):
        assert not key(generate_puzzles(300, "train", seed=seed)) & test
    # Offline loading: train follows the seed, test does not, and a smaller size is a prefix.
    task = get_task("countdown")
    small, large = task.load("train", size=5, seed=1), task.load("train", size=12, seed=1)
    assert [e.reference for e in small] == [e.reference for e in large[:5]]
    assert [e.reference for e in task.load("train", size=5, seed=2)] != [e.reference for e in small]
    assert [e.id for e in task.load("test", size=5, seed=1)] == [e.id for e in task.load("test", size=5, seed=2)]


def test_solver_exact_and_unsolvable_cases():
    assert solve_countdown([1, 1, 1], 100) is None         # by hand: the largest reachable value is 1 + 1 + 1
    assert solve_countdown([2, 3], 7) is None              # 2+3, 2*3, 3-2, 2-3, 2/3, 3/2: none is 7
    # No solution of these two keeps every intermediate an integer (checked by enumeration): they need
    # 6 / (1 - 5 / 7) and 8 / (3 - 8 / 3), so the search must be exact over fractions.
    assert_solves([1, 5, 6, 7], 21)
    assert_solves([3, 3, 8, 8], 24)
    assert_solves([44, 19, 35], 98)


def test_solver_solves_the_shared_rows():
    task = get_task("countdown")
    for ex in task.load("train", data_dir=shared_data_dir(), size=300):
        assert_solves(ex.reference["nums"], ex.reference["target"])


# --- loaders on the real files ---------------------------------------------------------------------

@pytest.mark.parametrize("name, counts", [
    ("countdown", {"train": 10240, "test": 1024, "dev": 500}),      # dev: generated (500 by default)
    ("mbpp", {"prompt": 10, "test": 500, "validation": 90, "train": 374}),
    ("gsm8k", {"train": 7473, "test": 1319}),
    # BFCL rows with answers (2501) less Java and JavaScript (150), plus API-Bank (399 + 127) less the 26
    # API-Bank rows that repeat another row's conversation, tools and answer, less the 4 BFCL rows no call
    # can pass (live_simple 106 and 112: no acceptable value; live_multiple 862 and 964: undeclared parameter).
    ("function_calling", {"all": 2501 - 150 + 399 + 127 - 26 - 4}),
])
def test_real_split_sizes_ids_and_disjointness(name, counts):
    task, folder = get_task(name), shared_data_dir()
    splits = {s: task.load(s, data_dir=folder) for s in task.splits}
    if "all" in counts:
        assert sum(len(v) for v in splits.values()) == counts["all"]
        assert 0.15 < len(splits["test"]) / counts["all"] < 0.25
    else:
        assert {s: len(v) for s, v in splits.items()} == counts
    ids = [ex.id for v in splits.values() for ex in v]
    assert len(ids) == len(set(ids))
    prompts = {s: {json.dumps(ex.messages) for ex in v} for s, v in splits.items()}
    assert not prompts["train"] & prompts["test"]


def test_function_calling_split_does_not_depend_on_size_or_seed():
    task, folder = get_task("function_calling"), shared_data_dir()
    test_ids = {ex.id for ex in task.load("test", data_dir=folder)}
    for size, seed in ((30, 0), (300, 0), (300, 7)):
        assert {ex.id for ex in task.load("test", data_dir=folder, size=size, seed=seed)} <= test_ids
        assert not {ex.id for ex in task.load("train", data_dir=folder, size=size, seed=seed)} & test_ids
    a = task.load("train", data_dir=folder, size=30, seed=0)
    assert [e.id for e in a] == [e.id for e in task.load("train", data_dir=folder, size=300, seed=0)[:30]]
    assert [e.id for e in a] != [e.id for e in task.load("train", data_dir=folder, size=30, seed=1)]
    # A small sample mixes the sources instead of taking the first file.
    assert len({ex.id.split("-")[0] for ex in a}) > 1


def _find(task, folder, example_id):
    return next(ex for s in task.splits for ex in task.load(s, data_dir=folder) if ex.id == example_id)


def test_prompts_of_known_rows():
    folder = shared_data_dir()
    first = get_task("countdown").load("train", data_dir=folder, size=1)[0]
    assert first.reference == {"nums": [44, 19, 35], "target": 98}
    assert "[44, 19, 35]" in first.messages[-1]["content"] and "98" in first.messages[-1]["content"]
    assert "<answer>" in first.messages[-1]["content"]

    row = json.loads(next(line for line in open(folder / "mbpp" / "mbpp.jsonl") if '"task_id": 11,' in line))
    ex = _find(get_task("mbpp"), folder, "mbpp-11")
    content = ex.messages[-1]["content"]
    assert content.startswith(f"You are an expert Python programmer, and here is your task: {row['text']} "
                              "Your code should pass these tests:\n\n" + "\n".join(row["test_list"]))
    assert "```python" in content and ex.reference["tests"] == row["test_list"]

    bfcl = _find(get_task("function_calling"), folder, "bfcl-simple_python_0")
    question = json.loads(open(folder / "function_calling" / "bfcl" / "BFCL_v4_simple_python.json").readline())
    assert bfcl.messages[0]["role"] == "system" and question["function"][0]["name"] in bfcl.messages[0]["content"]
    assert bfcl.messages[-1] == {"role": "user", "content": question["question"][0][0]["content"]}

    apibank = _find(get_task("function_calling"), folder, "apibank_l2-0")
    assert "User: Can you tell me what happened on October 6th in history?" in apibank.messages[-1]["content"]
    assert "Assistant: " in apibank.messages[-1]["content"] and apibank.messages[-1]["role"] == "user"


def gold_calls(answers, tools=None) -> str:
    """Independent of verifiers.format_calls: the calls an answer key describes. A BFCL key lists the
    acceptable values of each parameter ("" = may be left out); a dict inside lists them per key again
    (a bare value there is the one acceptable value). BFCL's checker rejects a parameter the function's
    doc does not declare, and needs every required one, even when "" is its only acceptable value."""
    def pick(options):
        return value(next((o for o in options if o != ""), None))

    def value(v):
        if isinstance(v, dict):
            return {k: pick(o if isinstance(o, list) else [o]) for k, o in v.items() if o != [""]}
        return [value(x) for x in v] if isinstance(v, list) else v

    def arguments(name, params):
        doc = next((t.get("parameters", {}) for t in tools or [] if t.get("name") == name), None)
        declared, required = (doc.get("properties", {}), doc.get("required", [])) if doc else (params, [])
        return {p: "" if v == [""] else pick(v) for p, v in params.items()
                if p in declared and (v != [""] or p in required)}
    if all("name" in a and "arguments" in a for a in answers):
        return json.dumps(answers)
    return json.dumps([{"name": name, "arguments": arguments(name, params)}
                       for answer in answers for name, params in answer.items()])


def test_real_references_pass_their_verifiers():
    folder = shared_data_dir()
    task = get_task("countdown")
    rows = [json.loads(line) for line in open(folder / "countdown" / "countdown_3to4_test.jsonl")][:50]
    for ex, row in zip(task.load("test", data_dir=folder, size=50), rows):
        assert task.check(f"<answer> {row['reference_solution']} </answer>", ex).ok
    task = get_task("function_calling")
    for ex in task.load("train", data_dir=folder) + task.load("test", data_dir=folder):
        assert task.check(gold_calls(ex.reference["answers"], ex.reference.get("tools")), ex).ok, ex.id
        assert not task.check("[]", ex).ok
    task = get_task("gsm8k")
    for ex in task.load("test", data_dir=folder, size=50):
        assert task.check("So the answer is\n#### " + ex.reference["answer"].split("####")[-1].strip(), ex).ok


# --- the offline samples ---------------------------------------------------------------------------

def all_offline(name):
    task = get_task(name)
    return task, [ex for split in task.splits for ex in task.load(split, size=None if name != "countdown" else 30)]


def test_offline_splits_are_disjoint_and_non_empty():
    for name in TASKS:
        task = get_task(name)
        ids = {s: {ex.id for ex in task.load(s, size=None if name != "countdown" else 20)} for s in task.splits}
        assert all(ids.values()), name
        assert not ids["train"] & ids["test"], name


def test_offline_mbpp_reference_code_passes_and_a_wrong_function_fails():
    task, examples = all_offline("mbpp")
    assert len(examples) == 40 and all(len(ex.reference["tests"]) == 3 for ex in examples)
    right = [f"```python\n{ex.reference['code']}\n```" for ex in examples]
    assert all(v.ok for v in task.check_batch(right, examples))
    # The same code with the tested function replaced by one that returns None.
    names = [next(n.name for n in ast.parse(ex.reference["code"]).body if isinstance(n, ast.FunctionDef))
             for ex in examples]
    wrong = [f"```python\n{ex.reference['code']}\n{name} = lambda *a, **k: None\n```"
             for ex, name in zip(examples, names)]
    assert not any(v.ok for v in task.check_batch(wrong, examples))


def test_offline_function_calls_pass_and_wrong_calls_fail():
    from verifiers import format_calls
    task, examples = all_offline("function_calling")
    assert len(examples) >= 30 and sum(len(ex.reference["answers"]) == 2 for ex in examples) >= 5
    for ex in examples:
        answers = ex.reference["answers"]
        assert task.check(format_calls(answers), ex).ok, ex.id
        assert task.check(json.dumps(answers), ex).ok, ex.id
        changed = json.loads(json.dumps(answers))
        first = changed[0]["arguments"]
        key = sorted(first)[0]
        first[key] = "wrong" if not isinstance(first[key], str) else first[key] + " wrong"
        assert not task.check(json.dumps(changed), ex).ok, ex.id
        assert not task.check(json.dumps(answers[:-1] if len(answers) > 1 else []), ex).ok, ex.id
        # Every answer names a tool that the prompt shows.
        assert all(f'"name": "{a["name"]}"' in ex.messages[0]["content"] for a in answers)


def test_offline_gsm8k_and_countdown_answers():
    task, examples = all_offline("gsm8k")
    assert len(examples) >= 20
    for ex in examples:
        number = ex.reference["answer"].split("####")[-1].strip()
        assert task.check(f"Some reasoning.\n#### {number}", ex).ok
        assert not task.check(f"Some reasoning.\n#### {Fraction(number.replace(',', '')) + 1}", ex).ok
        assert ex.messages[-1]["content"].endswith("#### <number>")
    task, examples = all_offline("countdown")
    for ex in examples:
        nums, target = ex.reference["nums"], ex.reference["target"]
        assert task.check(f"<answer> {solve_countdown(nums, target)} </answer>", ex).ok
        assert not task.check("<answer> " + " + ".join(map(str, nums)) + f" + {target} </answer>", ex).ok


# --- prompts ---------------------------------------------------------------------------------------

def test_reflection_prompts_are_the_papers():
    tool = ("You tried performing the task, but failed in generating the correct tool call. Reflect on what "
            "went wrong and write a short explanation that will help you do better next time.")
    answer = ("You tried solving the problem and got the wrong answer. Reflect on what went wrong and write a "
              "short explanation that will help you do better next time.")
    assert get_task("function_calling").reflection_prompt == tool
    assert all(get_task(n).reflection_prompt == answer for n in ("countdown", "mbpp", "gsm8k"))
    assert "<answer>" in get_task("countdown").retry_prompt and "```python" in get_task("mbpp").retry_prompt
    assert "JSON list" in get_task("function_calling").retry_prompt and "####" in get_task("gsm8k").retry_prompt


def test_reflector_messages_carry_problem_attempt_and_feedback_verbatim():
    task = get_task("mbpp")
    ex = task.load("test", size=1)[0]
    feedback = "Tests passed:\nassert f(1) == 2\nTests failed:\nassert f(2) == 3  # output: 4"
    failed = "```python\ndef f(x):\n    return x * 2\n```"
    messages = reflector_messages(task, ex, failed, feedback)
    text = messages[-1]["content"]
    assert messages[-1]["role"] == "user"
    assert feedback in text and failed in text and ex.messages[-1]["content"] in text and "```python" in text
    fc = get_task("function_calling")
    ex = fc.load("train", size=1)[0]
    text = reflector_messages(fc, ex, "[]", "expected 1 call, got 0")[-1]["content"]
    assert "expected 1 call, got 0" in text and ex.messages[0]["content"] in text


# --- bad input -------------------------------------------------------------------------------------

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


MBPP_ROW = dict(text="Add.", code="def add(a, b):\n    return a + b", task_id=11, test_setup_code="",
                test_list=["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"])


def test_bad_jsonl_lines_name_the_file_and_line(tmp_path):
    good = json.dumps(MBPP_ROW)
    write(tmp_path / "mbpp" / "mbpp.jsonl", good + "\n" + good.replace("11", "12") + "\n{not json\n")
    with pytest.raises(DataError, match=r"mbpp\.jsonl line 3: not valid JSON"):
        get_task("mbpp").load("test", data_dir=tmp_path)
    missing = {k: v for k, v in MBPP_ROW.items() if k != "test_list"}
    write(tmp_path / "mbpp" / "mbpp.jsonl", good + "\n\n" + json.dumps(missing) + "\n")
    with pytest.raises(DataError, match=r"mbpp\.jsonl line 3: missing field 'test_list'"):
        get_task("mbpp").load("test", data_dir=tmp_path)
    write(tmp_path / "countdown" / "countdown_3to4_train.jsonl", '{"target": 24, "nums": [1, 2, 3]}\n'
                                                                   '{"target": 24, "nums": "1 2 3"}\n')
    with pytest.raises(DataError, match=r"countdown_3to4_train\.jsonl line 2: 'nums' must be"):
        get_task("countdown").load("train", data_dir=tmp_path)
    write(tmp_path / "gsm8k" / "test.jsonl", '{"question": "1 + 1?", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl line 1: 'answer' must end with '#### <number>'"):
        get_task("gsm8k").load("test", data_dir=tmp_path)


def test_missing_files_and_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=r"gsm8k/train\.jsonl: file not found"):
        get_task("gsm8k").load("train", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"mbpp/mbpp\.jsonl: file not found"):
        get_task("mbpp").load("train", data_dir=tmp_path)
    with pytest.raises(DataError, match=r"function_calling: folder not found"):
        get_task("function_calling").load("train", data_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "nowhere"))


def test_bad_function_calling_rows_name_the_file_and_line(tmp_path):
    row = {"query": "Weather in Oslo?", "tools": [{"name": "w", "parameters": {}}],
           "answers": [{"name": "w", "arguments": {}}]}
    bad = {k: v for k, v in row.items() if k != "answers"}
    path = write(tmp_path / "function_calling" / "apibank_hammer" / "x.json", json.dumps([row, bad], indent=1))
    line = [n for n, text in enumerate(path.read_text().splitlines(), 1) if text == " {"][1]   # the second row
    with pytest.raises(DataError, match=rf"x\.json line {line}: missing field 'answers'"):
        get_task("function_calling").load("train", data_dir=tmp_path)
    write(path, '[\n {"query": "a", "tools": "[]", "answers": "[]"},\n {"query": oops}\n]')
    with pytest.raises(DataError, match=r"x\.json line 3: not valid JSON"):
        get_task("function_calling").load("train", data_dir=tmp_path)
    write(path, json.dumps([dict(row, tools="[{not json")]))
    with pytest.raises(DataError, match=r"x\.json line 1: field 'tools' is not valid JSON"):
        get_task("function_calling").load("train", data_dir=tmp_path)
    path.unlink()
    bfcl = tmp_path / "function_calling" / "bfcl"
    question = {"question": [[{"role": "user", "content": "hi"}]], "function": [{"name": "w"}]}
    write(bfcl / "BFCL_v4_simple_python.json",
          json.dumps(dict(question, id="a")) + "\n" + json.dumps(dict(question, id="b")))
    write(bfcl / "possible_answer" / "BFCL_v4_simple_python.json", json.dumps({"id": "a", "ground_truth": [{"w": {}}]}))
    with pytest.raises(DataError, match=r"BFCL_v4_simple_python\.json line 2: no possible answer for id 'b'"):
        get_task("function_calling").load("train", data_dir=tmp_path)


def test_parquet_without_pyarrow_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)          # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    write(tmp_path / "countdown" / "countdown_3to4_train.parquet", "PAR1")
    with pytest.raises(DataError, match=r"countdown_3to4_train\.parquet: reading parquet needs pyarrow.*JSON Lines"):
        get_task("countdown").load("train", data_dir=tmp_path)


def test_bad_names_list_the_valid_ones(monkeypatch, tmp_path):
    with pytest.raises(DataError, match="known: countdown, countdown_easy, function_calling, mbpp, gsm8k"):
        get_task("apigen")
    with pytest.raises(DataError, match="splits train, test, validation, prompt"):
        get_task("mbpp").load("dev")
    with pytest.raises(DataError, match="splits train, test"):
        get_task("gsm8k").load("validation")
    with pytest.raises(DataError, match="size"):
        get_task("gsm8k").load("train", size=-1)
    with pytest.raises(ValueError, match="1 completions for 0 examples"):
        get_task("gsm8k").check_batch(["#### 1"], [])
    monkeypatch.delenv("RRR_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("RRR_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir(str(tmp_path / "..")) == tmp_path / ".."   # the flag wins over the variable


def test_easy_tier_and_the_warm_starts_labels():
    """countdown_easy: 3 numbers in 1..20, targets in 10..100, each solvable, train and test apart. The
    warm start's labels: answers the verifier accepts, to puzzles none of which is in the test split."""
    from verifiers import check_countdown
    from warmstart import labelled_examples
    task = get_task("countdown_easy")
    train, test = task.load("train", size=300, seed=0), task.load("test", size=300)
    for ex in train + test:
        nums, target = ex.reference["nums"], ex.reference["target"]
        assert len(nums) == 3 and all(1 <= n <= 20 for n in nums) and 10 <= target <= 100
        assert solve_countdown(nums, target) is not None
    key = lambda ex: (tuple(sorted(ex.reference["nums"])), ex.reference["target"])  # noqa: E731
    whole_test = {key(ex) for ex in task.load("test")}
    assert not {key(ex) for ex in train} & whole_test
    labelled, left_out = labelled_examples("countdown_easy", 200, None)
    assert len(labelled) == 200 and left_out == 0          # the hash split already keeps them apart
    assert not {(tuple(sorted(n)), t) for n, t, _ in labelled} & whole_test
    for n, t, answer in labelled:
        assert check_countdown(answer, n, t).ok, (n, t, answer)
    # The default tier is unchanged by the easy one: the same generated puzzles as before.
    assert generate_puzzles(3, "test", 0) == generate_puzzles(3, "test", 0, "countdown")


def test_warm_start_leaves_out_the_real_test_files_puzzles(tmp_path):
    """With --data-dir the test split is a file the generator knows nothing of: a generated puzzle that is
    in it is left out of the warm start's labels (and another drawn in its place)."""
    from warmstart import WARM_SEED, labelled_examples
    first = generate_puzzles(3, "train", WARM_SEED, "countdown")
    (tmp_path / "countdown").mkdir()
    (tmp_path / "countdown" / "countdown_3to4_test.jsonl").write_text(
        json.dumps({"target": first[1][1], "nums": list(reversed(first[1][0]))}) + "\n")
    labelled, left_out = labelled_examples("countdown", 3, tmp_path)
    assert left_out == 1 and [(n, t) for n, t, _ in labelled] == [first[0], first[2]] + \
        [p for p in generate_puzzles(4, "train", WARM_SEED, "countdown")[3:]]



def test_warm_start_reflection_rows_are_the_turns_rrr_samples_after():
    """warmstart.py --reflections: per puzzle, the answer row, then the reflection row whose prompt is what
    rrr.py samples a reflection after (its reflection_prefix on the wrong answer), then the retry row whose
    prompt continues it with the retry-prompt turn; the wrong answer fails the verifier and the reflection
    states its value and the distance to the target, checked here by hand."""
    import re
    from types import SimpleNamespace

    import conversation
    import rrr
    from model import load_tokenizer
    from verifiers import check_countdown
    from warmstart import labelled_examples, labelled_rows
    tok, task = load_tokenizer(None), get_task("countdown_easy")
    labelled, _ = labelled_examples("countdown_easy", 20, None)
    rows = labelled_rows(tok, "countdown_easy", labelled, reflections=True)
    assert len(rows) == 60 and labelled_rows(tok, "countdown_easy", labelled, False) == rows[::3]
    cfg = SimpleNamespace(reflection_feedback=False, reflection_prompt=task.reflection_prompt)
    pol, eos = SimpleNamespace(tokenizer=tok), tok.eos_token_id
    for (nums, target, answer), (question, first), (asked, reflection), (retry_prompt, retry) in zip(
            labelled, rows[::3], rows[1::3], rows[2::3]):
        assert tok.decode(first) == tok.decode(retry) == answer + tok.eos_token and check_countdown(answer, nums,
                                                                                                    target).ok
        wrong = tok.decode(asked[len(question):]).split(tok.eos_token)[0]
        attempt = list(tok(wrong, add_special_tokens=False)["input_ids"]) + [eos]
        assert asked == rrr.reflection_prefix(cfg, pol, question, attempt, eos, "unused")
        assert retry_prompt == asked + reflection + list(conversation.turn(tok, task.retry_prompt, eos))
        equation = re.fullmatch(r"<answer> (.+) </answer>", wrong).group(1)
        value = Fraction(eval(equation, {"__builtins__": {}}))
        assert value != target and not check_countdown(wrong, nums, target).ok
        text = tok.decode(reflection[:-1])
        assert text.startswith(f"My equation {equation} equals {value}, not {target}: {abs(value - target)} too "
                               f"{'high' if value > target else 'low'}.")


# --- Countdown's dev split -------------------------------------------------------------------------

def puzzle_keys(examples) -> set:
    return {(tuple(sorted(ex.reference["nums"])), ex.reference["target"]) for ex in examples}


# Recorded with the code from before the dev split existed: (id, nums, target) of the first three test and
# train (seed 0) puzzles, and a checksum of those rows for the whole test split at its maximum size and for
# 300 train puzzles of seeds 0 and 1. Adding the dev split must not move any of them.
BEFORE_DEV = {
    "countdown": dict(
        test=[("countdown-gen-test-s0-0", [10, 82, 9, 85], 39), ("countdown-gen-test-s0-1", [30, 2, 22, 31], 45),
              ("countdown-gen-test-s0-2", [7, 38, 35], 66)],
        train=[("countdown-gen-train-s0-0", [38, 66, 33, 64], 100),
               ("countdown-gen-train-s0-1", [13, 5, 15, 68], 91), ("countdown-gen-train-s0-2", [14, 54, 43], 25)],
        test_max=1024, test_crc=949763715, train_crc=(883732459, 3101951671)),
    "countdown_easy": dict(
        test=[("countdown_easy-gen-test-s0-0", [8, 8, 12], 28), ("countdown_easy-gen-test-s0-1", [14, 5, 8], 30),
              ("countdown_easy-gen-test-s0-2", [16, 15, 12], 19)],
        train=[("countdown_easy-gen-train-s0-0", [12, 13, 17], 65), ("countdown_easy-gen-train-s0-1", [3, 8, 17], 59),
               ("countdown_easy-gen-train-s0-2", [4, 5, 12], 21)],
        test_max=700, test_crc=1124899497, train_crc=(1577784229, 2464338598)),
}
DEV_MAX = {"countdown": 1000, "countdown_easy": 300}


def rows(examples) -> list:
    return [(ex.id, ex.reference["nums"], ex.reference["target"]) for ex in examples]


@pytest.mark.parametrize("tier", list(BEFORE_DEV))
def test_train_and_test_puzzles_are_those_from_before_the_dev_split(tier):
    task, before = get_task(tier), BEFORE_DEV[tier]
    test = task.load("test", size=before["test_max"])
    assert rows(test[:3]) == before["test"] and zlib.crc32(repr(rows(test)).encode()) == before["test_crc"]
    assert rows(task.load("test", size=3, seed=5)) == before["test"]
    train = [task.load("train", size=300, seed=seed) for seed in (0, 1)]
    assert rows(train[0][:3]) == before["train"]
    assert tuple(zlib.crc32(repr(rows(t)).encode()) for t in train) == before["train_crc"]


@pytest.mark.parametrize("tier", list(BEFORE_DEV))
def test_dev_split_shares_no_puzzle_with_train_test_or_the_warm_start(tier):
    """The whole dev split against the whole test split, the warm start's puzzles and the train puzzles of
    three seeds: 2000 each for countdown_easy (most of its train puzzles: without the hash buckets they
    would meet), 1000 for countdown (whose puzzles rarely meet by chance: more would only take longer)."""
    from warmstart import labelled_examples
    task = get_task(tier)
    dev = task.load("dev", size=DEV_MAX[tier])
    assert len(puzzle_keys(dev)) == len(dev) == DEV_MAX[tier]
    assert [ex.id for ex in dev[:2]] == [f"{tier}-gen-dev-0", f"{tier}-gen-dev-1"]
    assert rows(task.load("dev", size=5, seed=7)) == rows(dev[:5])           # the same for every run
    assert not puzzle_keys(dev) & puzzle_keys(task.load("test", size=BEFORE_DEV[tier]["test_max"]))
    for seed in (0, 1, 2):
        train = task.load("train", size=2000 if tier == "countdown_easy" else 1000, seed=seed)
        assert not puzzle_keys(dev) & puzzle_keys(train)
    labelled, _ = labelled_examples(tier, 500, None)
    assert not puzzle_keys(dev) & {(tuple(sorted(n)), t) for n, t, _ in labelled}
    for ex in dev[:100]:
        nums, target = ex.reference["nums"], ex.reference["target"]
        assert len(nums) in ((3, 4) if tier == "countdown" else (3,)) and 10 <= target <= 100
        assert all(1 <= n <= (99 if tier == "countdown" else 20) for n in nums)
        assert_solves(nums, target)


def test_dev_split_leaves_out_the_rows_of_a_data_folder(tmp_path):
    """The real files know nothing of the hash buckets, so a generated dev puzzle may be one of their rows:
    it is left out (in any order of its numbers), the other puzzles keep their ids, and more are drawn."""
    offline = get_task("countdown").load("dev", size=6)
    row = lambda ex: json.dumps(dict(target=ex.reference["target"], nums=ex.reference["nums"][::-1]))  # noqa: E731
    (tmp_path / "countdown").mkdir()
    (tmp_path / "countdown" / "countdown_3to4_train.jsonl").write_text(row(offline[1]) + "\n")
    (tmp_path / "countdown" / "countdown_3to4_test.jsonl").write_text(row(offline[3]) + "\n")
    dev = get_task("countdown").load("dev", data_dir=tmp_path, size=4)
    assert rows(dev) == rows([offline[0], offline[2], offline[4], offline[5]])


def test_dev_split_is_apart_from_the_shared_real_files():
    folder = shared_data_dir()
    real = {(tuple(sorted(row["nums"])), row["target"]) for split in ("train", "test")
            for row in map(json.loads, open(folder / "countdown" / f"countdown_3to4_{split}.jsonl"))}
    dev = get_task("countdown").load("dev", data_dir=folder)
    assert len(dev) == 500 and not puzzle_keys(dev) & real
    # The files do hold some of the generated dev puzzles; the others keep their place and id.
    offline = get_task("countdown").load("dev")
    kept = [ex for ex in offline if puzzle_keys([ex]) - real]
    assert len(kept) < len(offline) and rows(dev[:len(kept)]) == rows(kept)


def test_generated_test_and_dev_splits_have_a_maximum():
    for tier, most in (("countdown", dict(test=1024, dev=1000)), ("countdown_easy", dict(test=700, dev=300))):
        for split, n in most.items():
            with pytest.raises(DataError, match=rf"^the generated {tier} {split} split has {n} puzzles at most, "
                                                rf"not {n + 1}$"):
                get_task(tier).load(split, size=n + 1)
    with pytest.raises(DataError, match=r"^task gsm8k has splits train, test, not 'dev'$"):
        get_task("gsm8k").load("dev")


def test_eval_split_flag():
    """rrr.py --eval-split: dev is accepted for the Countdown tasks and refused, in one line, for the others
    (before torch loads: tests/test_runs.py's BAD_COMMAND_LINES); load_splits scores the split asked."""
    import rrr
    from data import check_split, load_splits
    from runs import parse_config
    cfg = parse_config(rrr.Config, ["--task", "countdown_easy", "--eval-split", "dev"])
    rrr.check_flags(cfg)
    assert cfg.eval_split == "dev" and parse_config(rrr.Config, []).eval_split == "test"
    with pytest.raises(DataError, match=r"^--eval-split dev: task mbpp has no dev split \(it has train, test, "
                                        r"validation, prompt\)$"):
        check_split("mbpp", "dev", "--eval-split")
    _, _, scored = load_splits("countdown_easy", None, 2, 3, seed=4, eval_split="dev")
    assert [ex.id for ex in scored] == [f"countdown_easy-gen-dev-{i}" for i in range(3)]
