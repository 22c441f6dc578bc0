"""Test reference: an independent re-implementation of the rules of BFCL's AST checker (Berkeley
Function Calling Leaderboard, public repository ShishirPatil/gorilla, file
berkeley-function-call-leaderboard/bfcl_eval/eval_checker/ast_eval/ast_checker.py), Python categories
only, written from a reading of those rules; plus a deterministic mutation corpus built from BFCL
possible answers. Used only by tests, to check `verifiers.check_function_calls` against.

Calls are decoded `[{"name": str, "arguments": dict}]`; `ground_truth` is a BFCL possible answer
`[{func_name: {param: [acceptable values]}}]`; `functions` is the question row's `function` list.
"""

import copy
import json
import re

_PY_TYPE = {"string": str, "integer": int, "float": float, "boolean": bool,
            "array": list, "tuple": list, "dict": dict, "any": str}
_IGNORED = re.compile(r"[ ,./\-_*^]")  # plain space and , . / - _ * ^ only (tabs, newlines stay)


def standardise(text: str) -> str:
    """BFCL's string normal form: drop the characters above, lowercase, ' -> "."""
    return _IGNORED.sub("", text).lower().replace("'", '"')


def _norm(value):
    return standardise(value) if type(value) is str else value


def _hint(acceptable):
    """Type of the first acceptable value other than the optional marker "" (None if none)."""
    return next((type(a) for a in acceptable if a != ""), None)


def _dict_fits(value, candidate) -> bool:
    """One dict against one {key: [acceptable]} candidate: no unknown key, each value (strings
    standardised, everything else by ==) among its key's acceptable values, absent keys optional."""
    if not isinstance(value, dict) or not isinstance(candidate, dict):
        return False  # the official code never gets here with these (it would raise)
    for key, item in value.items():
        if key not in candidate or _norm(item) not in [_norm(a) for a in candidate[key]]:
            return False
    return all(key in value or "" in acc for key, acc in candidate.items())


def _items_typed(value: list, candidate, item_type) -> bool:
    """Nested (one level) type check of a list's items against one acceptable value: items must have
    the declared item type or the type of that acceptable list's first non-"" item; an acceptable
    value that is not a list (e.g. the optional marker "") lets any items through."""
    if type(candidate) is not list:
        return True
    hint = _hint(candidate)
    return all(type(x) is item_type or (hint is not None and type(x) is hint) for x in value)


def _value_ok(value, acceptable: list, spec: dict) -> bool:
    declared = spec["type"]
    want = _PY_TYPE[declared]
    item_type = _PY_TYPE[spec["items"]["type"]] if declared in ("array", "tuple") else None
    if declared == "float" and type(value) is int:  # int accepted for float (top level only)
        value = float(value)
    hint = _hint(acceptable)
    # "Variable" mode: the acceptable values are not of the declared type (e.g. "True" for a boolean);
    # then the value only needs that type and is compared by plain ==, without standardisation.
    variable = hint is not None and hint is not want
    if type(value) is want:  # exact type: bool is not int, int is not float (after the conversion)
        if item_type is not None and not any(_items_typed(value, c, item_type) for c in acceptable):
            return False
    elif hint is not None and type(value) is hint:
        variable = True
    else:
        return False
    if variable:
        return value in acceptable
    if want is dict:
        return any(c != "" and _dict_fits(value, c) for c in acceptable)
    if want is list and item_type is dict:  # same length, dict i against candidate's dict i
        return any(isinstance(c, (list, str)) and len(c) == len(value)
                   and all(_dict_fits(v, d) for v, d in zip(value, c)) for c in acceptable)
    if want is str:
        return standardise(value) in [standardise(c) for c in acceptable if type(c) is str]
    if want is list:  # ordered; string items standardised; "" stands for [] here
        return [_norm(x) for x in value] in [[_norm(x) for x in c] for c in acceptable
                                              if isinstance(c, (list, str))]
    return value in acceptable  # int, float, bool: Python ==


def _call_ok(doc: dict, arguments: dict, expected: dict) -> bool:
    props, required = doc["parameters"]["properties"], doc["parameters"]["required"]
    if any(p not in arguments for p in required):
        return False
    for param, value in arguments.items():
        if param not in props or param not in expected:  # unknown to the doc or to the answer
            return False
        if not _value_ok(value, expected[param], props[param]):
            return False
    return all(p in arguments or "" in acc for p, acc in expected.items())


def official_verdict(calls: list, ground_truth: list, functions: list) -> bool:
    """The official verdict. For one expected call (simple/multiple categories) this is the check of
    the single output; for several (parallel) it is BFCL's order-free pairing: each ground-truth
    entry in turn takes the FIRST still-unpaired call that fits it (greedy, no backtracking)."""
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments"), dict)
            for c in calls):
        return False
    if len(calls) != len(ground_truth):
        return False
    docs = {}
    for doc in functions:
        docs.setdefault(doc["name"], doc)
    paired = set()
    for entry in ground_truth:
        (name, expected), = entry.items()
        hit = next((i for i, c in enumerate(calls) if i not in paired and c["name"] == name
                    and _call_ok(docs[name], c["arguments"], expected)), None)
        if hit is None:
            return False
        paired.add(hit)
    return True


# ---------------------------------------------------------------- mutation corpus

_GONE = object()
_FILLER = {"string": "x", "integer": 1, "float": 1.5, "boolean": True, "array": ["x"], "tuple": ["x"],
           "dict": {"x": "x"}, "any": "x"}


def _pick_dict(candidate: dict, k=0) -> dict:
    """{key: [acceptable]} -> {key: value}, the k-th acceptable value (or the last); "" leaves the key out."""
    out = {}
    for key, acc in candidate.items():
        value = acc[min(k, len(acc) - 1)] if acc else ""
        if value != "":
            out[key] = copy.deepcopy(value)
    return out


def _pick(acceptable: list, spec: dict, k=0):
    value = acceptable[k]
    if spec.get("type") == "dict" and isinstance(value, dict):
        return _pick_dict(value)
    if spec.get("items", {}).get("type") == "dict" and isinstance(value, list):
        return [_pick_dict(d) if isinstance(d, dict) else d for d in value]
    return copy.deepcopy(value)


def _walk(value, path):
    yield path, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _walk(child, path + (key,))


def _edit(calls, path, new):
    """Copy of `calls` with the value at path (call index, param, inner keys...) replaced or removed."""
    out = copy.deepcopy(calls)
    node = out[path[0]]["arguments"]
    for key in path[1:-1]:
        node = node[key]
    if new is _GONE:
        node.pop(path[-1]) if isinstance(node, list) else node.pop(path[-1], None)
    else:
        node[path[-1]] = new
    return out


def _insert(rng, text, piece):
    i = rng.randint(0, len(text))
    return text[:i] + piece + text[i:]


def _leaf_mutations(value, rng) -> list:
    if isinstance(value, bool):
        return [int(value), str(value), not value, None]
    if isinstance(value, int):
        return [float(value), str(value), value + 1, None] + ([bool(value)] if value in (0, 1) else [])
    if isinstance(value, float):
        return [int(value) if value.is_integer() else round(value), str(value), value + 0.5, None]
    if isinstance(value, str):
        return [value.upper(), value.swapcase(), value.title(), _insert(rng, value, " "),
                _insert(rng, value, "\t"), _insert(rng, value, "\n"), _IGNORED.sub("", value),
                _insert(rng, value, rng.choice(",./-_*^")), _insert(rng, value, rng.choice("!:;?")),
                value.replace("'", '"'), value.replace('"', "'"), _insert(rng, value, "'"), "", None]
    if isinstance(value, list):
        shuffled = value[:]
        rng.shuffle(shuffled)
        return [value[::-1], shuffled, [], value[:-1], value + value[:1], None]
    if isinstance(value, dict):
        out = [dict(value, zz_extra="x"), {}, None]
        if value:
            out.append({k: v for k, v in value.items() if k != rng.choice(list(value))})
        return out
    return ["None", 0]


def candidate_answers(ground_truth: list, functions: list, rng) -> list:
    """The first-acceptable answer plus systematic mutations of it; deterministic given `rng`. In the
    first answer an optional param whose first acceptable value is "" is left out (so is one the doc
    does not declare, when "" allows it); a required one takes its first other acceptable value."""
    docs = {}
    for doc in functions:
        docs.setdefault(doc["name"], doc)
    base = []
    for entry in ground_truth:
        (name, expected), = entry.items()
        props, required = docs[name]["parameters"]["properties"], docs[name]["parameters"]["required"]
        arguments = {}
        for p, acc in expected.items():
            if p in required and acc:  # a required param gets its first non-"" value (or "")
                arguments[p] = _pick(acc, props.get(p, {}), next((k for k, a in enumerate(acc) if a != ""), 0))
            elif acc and acc[0] != "" and not ("" in acc and p not in props):  # else "" first: left out
                arguments[p] = _pick(acc, props.get(p, {}))
        base.append({"name": name, "arguments": arguments})
    out = [base]
    sites = [((i, p) + path, v) for i, call in enumerate(base) for p, top in call["arguments"].items()
             for path, v in _walk(top, ())]
    dicts = [site for site in sites if isinstance(site[1], dict)]  # every dict, plus a sample of the rest
    others = [site for site in sites if not isinstance(site[1], dict)]
    for path, value in dicts + rng.sample(others, min(len(others), 6)):
        out += [_edit(base, path, new) for new in _leaf_mutations(value, rng)]
    for i, call in enumerate(base):
        (name, expected), = ground_truth[i].items()
        props = docs[name]["parameters"]["properties"]
        for p in list(call["arguments"])[:4]:  # dropped params
            out.append(_edit(base, (i, p), _GONE))
        for p, acc in expected.items():  # other acceptable values; omitted optional params added
            for k in range(1, min(len(acc), 3)):
                out.append(_edit(base, (i, p), _GONE if acc[k] == "" else _pick(acc, props.get(p, {}), k)))
            if p not in call["arguments"] and any(a != "" for a in acc):
                out.append(_edit(base, (i, p), _pick(acc, props.get(p, {}), next(
                    k for k, a in enumerate(acc) if a != ""))))
            if acc and isinstance(acc[0], dict):
                out.append(_edit(base, (i, p), _pick_dict(acc[0], 1)))
        extra = [p for p in props if p not in expected][:2]  # declared but not in the answer
        out += [_edit(base, (i, p), _FILLER.get(props[p].get("type"), "x")) for p in extra]
        out.append(_edit(base, (i, "zz_unknown"), "x"))
        names = [name + "_v2", name.upper(), name.replace(".", "_")]
        names += [d["name"] for d in functions if d["name"] != name][:2]
        for other in names:
            if other != name:
                out.append(copy.deepcopy(base))
                out[-1][i]["name"] = other
        out.append(base[:i] + base[i + 1:])  # dropped call
    out.append(base + base[-1:])  # extra call
    if len(base) > 1:
        shuffled = base[:]
        rng.shuffle(shuffled)
        out += [base[::-1], base[1:] + base[:1], shuffled]
        for k, calls in enumerate(out):  # order must not matter: reorder half the candidates
            if rng.random() < 0.5:
                out[k] = rng.sample(calls, len(calls))
    seen, unique = set(), []
    for calls in out:
        key = json.dumps(calls, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(calls)
    return unique
