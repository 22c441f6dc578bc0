"""BFCL possible answers, judged as BFCL's AST checker (ShishirPatil/gorilla, berkeley-function-call-
leaderboard) judges Python calls, quirks included, so that a pass here is a pass there:
verifiers.check_function_calls hands BFCL rows here. A possible answer is {function name: {parameter:
[acceptable values]}}, "" among the values marking a parameter that may be left out.

Where BFCL's checker would raise on a completion, the call fails. Not followed: its renaming of dotted
function names for some API models (our prompt shows the names as they are). It checks "any" as a string
and "tuple" as a list.
"""

import re

from runs import short

_BFCL_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool, "array": list, "tuple": list,
               "dict": dict, "any": str}
_TYPE_NAMES = {str: "string", int: "integer", float: "float", bool: "boolean", list: "list", dict: "object"}


def no_call(calls, expected_names, name) -> str:
    """What is wrong when no call satisfies the expected call to `name` (xLAM answers too)."""
    wrong = sorted({c["name"] for c in calls} - set(expected_names))
    return f"unknown function {wrong[0]!r}" if wrong else f"no call to {name}"


def bfcl_problem(calls, answers, tools) -> str | None:
    """None when the calls pass against BFCL possible answers; else what is wrong with the first expected
    call that none passes."""
    # BFCL pairs greedily, not by the best matching: each expected call in turn takes the first call, in
    # the completion's order, that is not yet taken and passes; if none passes, the answer is wrong.
    free = list(range(len(calls)))
    for answer in answers:
        name, params = next(iter(answer.items()))
        doc = next((t for t in tools or [] if isinstance(t, dict) and t.get("name") == name), None)
        problems = [(j, _call_problem(calls[j], name, params, doc)) for j in free]
        taken = next((j for j, problem in problems if problem is None), None)
        if taken is None:
            named = [problem for j, problem in problems if calls[j]["name"] == name]
            expected_names = [next(iter(a)) for a in answers]
            return named[0] if named else no_call([calls[j] for j in free], expected_names, name)
        free.remove(taken)
    return None


def _shown(value) -> str:
    return short(repr(value), 60)      # repr, so that a tab or a quote shows


def _call_problem(call, name, params, doc) -> str | None:
    """None when the call passes BFCL's checks against one possible answer; else the first failing one.
    Without the function's doc (tools=None, or no doc of that name) each parameter is taken to have the
    type of its first acceptable value, arrays get no item-type check (but an array of objects is still
    compared object by object), and only the possible answer says what is required."""
    if call["name"] != name:
        return f"called {call['name']}, expected {name}"
    args = call["arguments"]
    schema = (doc or {}).get("parameters") or {}
    declared = schema.get("properties") if doc is not None else None
    for key in schema.get("required", []):
        if key not in args:
            return f"missing argument {key!r} in {name}"
    for key, value in args.items():
        if key not in params or (declared is not None and key not in declared):
            return f"unexpected argument {key!r} in {name}"
        acceptable = params[key]
        outer, item = _declared_type((declared or {}).get(key), acceptable)
        if outer is float and type(value) is int:    # as Python would convert it; never a bool, never nested
            value = float(value)
        # An acceptable value whose type is not the declared one stands for a variable: BFCL then takes
        # a value of either type and compares it exactly, strings too.
        hint = _first_type(acceptable)
        variable = hint is not None and hint is not outer
        if type(value) is outer:
            if item is not None and not any(_items_typed(value, a, item) for a in acceptable):
                return (f"argument {key!r} of {name} should be a list of {_TYPE_NAMES[item]}s, "
                        f"got {_shown(value)}")
        elif type(value) is hint:
            variable = True
        elif outer is not None:
            return f"argument {key!r} of {name} should be of type {_TYPE_NAMES[outer]}, got {_shown(value)}"
        if not _bfcl_value_ok(value, acceptable, None if variable else outer, item):
            shown = [a for a in acceptable if a != ""]
            expected = _shown(shown[0]) if len(shown) == 1 else f"one of {_shown(shown)}"
            return f"argument {key!r} of {name} is {_shown(value)}, expected {expected}"
    for key, acceptable in params.items():
        if key not in args and "" not in acceptable:    # "" marks a parameter that may be left out
            return f"missing argument {key!r} in {name}"
    return None


def _declared_type(spec, acceptable):
    """(type, item type or None) of a parameter: from its doc, else from its first acceptable value."""
    if isinstance(spec, dict) and spec.get("type") in _BFCL_TYPES:
        items = spec.get("items") if spec["type"] in ("array", "tuple") else None
        item = _BFCL_TYPES.get(items.get("type")) if isinstance(items, dict) else None
        return _BFCL_TYPES[spec["type"]], item
    first = next((a for a in acceptable if a != ""), None)
    if type(first) not in _TYPE_NAMES:    # none, or null
        return None, None
    return type(first), dict if isinstance(first, list) and any(isinstance(x, dict) for x in first) else None


def _first_type(acceptable):
    """The type of the first acceptable value other than "" (NoneType for null), None when there is none."""
    return next((type(a) for a in acceptable if a != ""), None)


def _items_typed(value, acceptable, item) -> bool:
    # BFCL checks items one level deep, against each acceptable value in turn: an item passes with the
    # declared item type (no int-to-float conversion here) or the type of that value's first item. An
    # acceptable value that is not a list (the optional marker "", say) lets any items through.
    if not isinstance(acceptable, list):
        return True
    hint = _first_type(acceptable)
    return all(type(x) is item or type(x) is hint for x in value)


def _bfcl_value_ok(value, acceptable, outer, item) -> bool:
    """Whether a value of the right type is acceptable. Strings, also at a list's top level and as a
    dict's values, are compared after _standard; all else with Python's ==, so that inside lists and
    dicts 1, 1.0 and true are equal. List order matters."""
    if outer is dict:
        return _dict_ok(value, acceptable)
    if outer is list and item is dict:    # object by object against an acceptable list ("" = [])
        return any(isinstance(want, (list, str)) and len(want) == len(value)
                   and all(_dict_ok(v, [w]) for v, w in zip(value, want)) for want in acceptable)
    if outer is str:
        return _standard(value) in [_standard(a) for a in acceptable if type(a) is str]
    if outer is list:
        # a string among acceptable lists counts as the list of its characters (so "" as [])
        return [_standard(x) for x in value] in [[_standard(x) for x in a] for a in acceptable
                                                 if isinstance(a, (list, str))]
    return value in acceptable


def _dict_ok(value, acceptable) -> bool:
    # Each acceptable dict lists the acceptable values of each key, "" marking a key that may be left
    # out; a dict or list nested in the value is compared with == only.
    return isinstance(value, dict) and any(
        isinstance(want, dict)
        and all(k in want and isinstance(want[k], (list, str))
                and _standard(v) in [_standard(x) for x in want[k]] for k, v in value.items())
        and all(k in value or (isinstance(ok, (list, str)) and "" in ok) for k, ok in want.items())
        for want in acceptable)


def _standard(value):
    # BFCL forgives spacing and punctuation in strings, e.g. "April 1, 2024" and "april 1 2024": only the
    # space character goes (a tab or newline stays), case is ignored and ' counts as ". Other values stay.
    return re.sub(r"[ ,./\-_*^]", "", value).lower().replace("'", '"') if type(value) is str else value
