"""json_diff: two JSON texts compared in lockstep must report exactly what
``value_diff(json.loads(a), json.loads(b))`` reports, or give up (False, ``out`` untouched).

Hand cases cover every reason to give up and the usual same-shape pairs; Hypothesis generates
values, mutates them (scalars, keys dropped, added, reordered, arrays shortened, types swapped)
and serializes both with random whitespace, number spellings and escapes: whenever json_diff
decides, its paths are value_diff's, and the compiled and pure implementations agree.
"""

from __future__ import annotations

import importlib
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.analysis.diff import value_diff
from tests.conftest import NO_EXTENSIONS, load_compiled

pure = importlib.import_module("replay._fastparse_py")
compiled = None if NO_EXTENSIONS else load_compiled()
IMPLS = [pure] if compiled is None else [pure, compiled]


def expected(a, b) -> set:
    return value_diff(json.loads(a), json.loads(b), "$", set())


def run(impl, a, b):
    a = a.encode() if isinstance(a, str) else a
    b = b.encode() if isinstance(b, str) else b
    out = set()
    got = impl.json_diff(a, b, out)
    assert got in (True, False)
    if not got:
        assert out == set(), "out must be left untouched when giving up"
    return got, out


def run_all(a, b):
    """(decided, paths) of every implementation: they must agree."""
    results = [run(m, a, b) for m in IMPLS]
    assert all(r == results[0] for r in results), (a, b, results)
    return results[0]


def nest(n: int, leaf: str) -> str:
    return "[" * n + leaf + "]" * n


# -- decided --------------------------------------------------------------------------------------

DECIDED = [
    # typical same-shape responses
    ('{"id":1,"ts":"2024-01-01T00:00:00Z","price":10,"ok":true}',
     '{"id":1,"ts":"2024-01-02T00:00:00Z","price":11,"ok":true}', {"$.ts", "$.price"}),
    ('{"items":[{"price":1,"q":2},{"price":3,"q":2}],"n":2}',
     '{"items":[{"price":1,"q":2},{"price":4,"q":2}],"n":2}', {"$.items[*].price"}),
    ('{"a":{"b":{"c":[1,2,{"d":"x"}]}}}', '{"a":{"b":{"c":[1,2,{"d":"y"}]}}}', {"$.a.b.c[*].d"}),
    ('[{"k":[{"d":1}]}]', '[{"k":[{"d":2}]}]', {"$[*].k[*].d"}),
    ('{"a":1,"b":2}', '{"a":1,"b":2}', set()),
    # nested arrays and lengths
    ('[1,2,3]', '[1,2]', {"$[*]"}),
    ('[1,2]', '[1,2,3]', {"$[*]"}),
    ('[1,2,3]', '[1,9]', {"$[*]"}),
    ('[[1,2],[3]]', '[[1,2],[3,4]]', {"$[*][*]"}),
    ('{"a":[[1],[2,3]]}', '{"a":[[1],[2]]}', {"$.a[*][*]"}),
    ('[]', '[[1]]', {"$[*]"}),
    ('[{"a":1}]', '[]', {"$[*]"}),
    ('[1]', '[1, {"a": [1, 2, "x\\n"], "a": 3}]', {"$[*]"}),    # the extra element is only read
    ('[[1,2],[3,4]]', '[[1,5],[3]]', {"$[*][*]"}),
    # type changes
    ('{"a":{}}', '{"a":[]}', {"$.a"}),
    ('{"a":"1"}', '{"a":1}', {"$.a"}),
    ('{"a":null}', '{"a":0}', {"$.a"}),
    ('{"a":null}', '{"a":false}', {"$.a"}),
    ('{"a":true}', '{"a":false}', {"$.a"}),
    ('{"a":[1]}', '{"a":{"b":1}}', {"$.a"}),
    ('{"a":"x"}', '{"a":{"b":"y"}}', {"$.a"}),
    ('{"a":1}', '{"a":"[1]"}', {"$.a"}),
    ('{"a":"{"}', '{"a":"["}', {"$.a"}),           # one character: not JSON to value_diff
    ('{"a":1.5}', '{"a":"1.5"}', {"$.a"}),
    ('["\\u0041"]', '[1]', {"$[*]"}),               # an escaped string against another type
    ('{"a":"{\\"b\\":1}"}', '{"a":{"b":1}}', {"$.a"}),
    ('{"a":[1,{"b":[]}]}', '{"a":7}', {"$.a"}),
    # keys that are not names
    ('{"odd key":1,"":2,"a.b":3,"x-y":4,"$ref":5,"1a":6,"_":7,"a[0]":8,"\'":9}',
     '{"odd key":0,"":0,"a.b":0,"x-y":0,"$ref":0,"1a":0,"_":0,"a[0]":0,"\'":0}',
     {'$["odd key"]', '$[""]', '$["a.b"]', "$.x-y", "$.$ref", '$["1a"]', "$._", '$["a[0]"]',
      '$["\'"]'}),
    # whitespace
    ('{"a" : [ 1 , 2 ] }', '{\n\t"a":[1,3]}\r\n', {"$.a[*]"}),
    (' \n{"a":{ },"b":[ ]}', '{"a":{},"b":[]}  ', set()),
    # empty containers, top-level scalars and arrays
    ("{}", "{}", set()),
    ("[]", "[ ]", set()),
    ("{}", "[]", {"$"}),
    ("1", "2", {"$"}),
    ("1", "1", set()),
    ('"a"', '"b"', {"$"}),
    ("true", "null", {"$"}),
    ('"x"', "[1]", {"$"}),
    ("[1,2]", "[1,3]", {"$[*]"}),
    # equal tokens are equal values, escapes and floats included
    ('["\\u0041\\n", 1.5e3, -0, 1.0]', '["\\u0041\\n",1.5e3,-0,1.0]', set()),
    ('[1.5e3, 2]', '[1.5e3, 3]', {"$[*]"}),
    ('[1e400]', '[1e400]', set()),
    # integers differ by value
    ("[123456789012345678901234567890]", "[123456789012345678901234567891]", {"$[*]"}),
    ("[-1]", "[1]", {"$[*]"}),
    ("[0]", "[10]", {"$[*]"}),
    # strings without escapes
    ('{"s":"a b\\u0020"}', '{"s":"a b\\u0020"}', set()),
    ('{"s":"{"}', '{"s":"x"}', {"$.s"}),
    ('{"s":"a\x7fb"}', '{"s":"ab"}', {"$.s"}),
    # as deep as value_diff walks
    (nest(64, "1"), nest(64, "2"), {"$" + "[*]" * 64}),
    # many keys: the repeated-key check sorts them
    ("{" + ",".join(f'"k{i}":{i}' for i in range(50)) + "}",
     "{" + ",".join(f'"k{i}":{i + (i == 40)}' for i in range(50)) + "}", {"$.k40"}),
]


@pytest.mark.parametrize("a,b,paths", DECIDED)
def test_decided(impl, a, b, paths):
    assert expected(a, b) == expected(b, a) == paths    # the table says what value_diff says
    assert run(impl, a, b) == (True, paths)
    assert run(impl, b, a) == (True, paths)


def test_adds_to_out(impl):
    out = {"header:x"}
    assert impl.json_diff(b'{"a":1}', b'{"a":2}', out)
    assert out == {"header:x", "$.a"}


def test_same_results_both_ways():
    for a, b, _ in DECIDED:
        run_all(a, b)


# -- give up ----------------------------------------------------------------------------------------

INVALID = [
    '{"a":1', '{"a":1}x', '{"a":1} {}', "[1,]", '{"a" 1}', "01", "[01]", "[1 2]", '{"a":1,}', "{,}",
    "[,1]", '"a\x01b"', '"a\tb"', '"a\nb"', '"\\x"', '"\\u12"', '"\\u12g4"', "1.", ".5", "1e", "1e+",
    "-", "+1", "--1", "tru", "nulll", "truex", "[1]]", '{"a":1}}', '"abc', "{'a':1}", "{a:1}", "[1}",
    '{"a"}', '{"a":}', "[1,,2]", "[-]", "[1.e5]", "[0x10]", "[1]\x00", "\x00[1]", "[\x0b1]", "]",
    "", "   ", "\n",
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_gives_up(impl, text):
    with pytest.raises(ValueError):
        json.loads(text)
    valid = '{"a":1}'
    assert run(impl, text, text) == (False, set())
    assert run(impl, text, valid) == (False, set())
    assert run(impl, valid, text) == (False, set())


GIVE_UP = [
    # not JSON where a difference made the walk skip the rest
    ("[1]", "[1, 01]"), ('{"a":1}', '{"a":[1,]}'), ('{"a":"x"}', '{"a":{"b":1,}}'), ("[1]", "[2"),
    ('{"a":1,"b":2}', '{"a":2,"b":2} x'), ('[1,2]', '[3,"\x01"]'), ('{"a":"x"}', '{"a":[1 2]}'),
    # bytes >= 0x80, a byte order mark
    ('"\u00e9"'.encode("utf-8"), b'"e"'), (b'["a\x80"]', b'["a"]'), (b"\xef\xbb\xbf[1]", b"[1]"),
    (b'{"\xc3\xa9":1}', b'{"\xc3\xa9":2}'),
    # NaN and infinities (json.loads reads them)
    ("[NaN]", "[1]"), ("[NaN]", "[NaN]"), ("[Infinity]", "[1]"), ("[-Infinity]", "[-Infinity]"),
    ("NaN", "NaN"),
    # keys out of step
    ('{"a":1,"b":2}', '{"b":2,"a":1}'), ('{"a":1}', '{"a":1,"b":2}'), ('{"a":1,"b":2}', '{"a":1}'),
    ("{}", '{"a":1}'), ('{"a":1}', '{"b":1}'), ('{"a":1}', '{"ab":1}'),
    # repeated keys
    ('{"a":1,"a":2}', '{"a":3,"a":2}'), ('{"a":1,"a":1}', '{"a":1,"a":1}'),
    ("{" + ",".join(f'"k{i}":{i}' for i in range(40)) + ',"k3":0}',
     "{" + ",".join(f'"k{i}":{i}' for i in range(40)) + ',"k3":0}'),
    ('{"x":{"a":1,"b":{"a":1},"a":2}}', '{"x":{"a":1,"b":{"a":1},"a":2}}'),
    # keys with a backslash or outside 0x20..0x7e
    ('{"a\\"b":1}', '{"a\\"b":2}'), ('{"\\u0061":1}', '{"a":1}'), ('{"a\\/":1}', '{"a\\/":1}'),
    ('{"a\x7f":1}', '{"a\x7f":2}'),
    # strings: escapes, JSON held in strings
    ('["\\u0041"]', '["A"]'), ('["a\\n"]', '["b"]'), ('["a"]', '["\\/"]'),
    ('"[1,2]"', '"[1,3]"'), ('"{}"', '"x"'), ('"x"', '"[x"'), ('{"p":"{\\"a\\":1}"}', '{"p":"{\\"a\\":2}"}'),
    ('{"p":"[1]"}', '{"p":"[2]"}'),
    # numbers that may be equal
    ("[1]", "[1.0]"), ("[1]", "[1e0]"), ("[0]", "[-0]"), ("[-0]", "[1]"), ("[1.5]", "[2.5]"),
    ("[1]", "[2.5]"), ("[100]", "[1E2]"), ("[1.0]", "[1.00]"),
    ("[" + "1" * 700 + "]", "[" + "1" * 700 + "]"),
    # booleans against numbers
    ('{"a":true}', '{"a":1}'), ('{"a":false}', '{"a":0}'), ('{"a":true}', '{"a":2}'),
    ('[true]', '[1.0]'), ('[0]', '[false]'),
    # deeper than value_diff walks
    (nest(65, "1"), nest(65, "2")), (nest(65, "1"), nest(65, "1")), ("[2]", "[1, " + nest(70, "") + "]"),
    ('{"a":' + nest(64, "[]") + "}", '{"a":' + nest(64, "[]") + "}"),
]


@pytest.mark.parametrize("a,b", GIVE_UP)
def test_gives_up(impl, a, b):
    assert run(impl, a, b) == (False, set())
    assert run(impl, b, a) == (False, set())


def test_the_subtle_cases_need_giving_up():
    """What value_diff says where a lockstep walk would say otherwise."""
    assert expected('{"a":true}', '{"a":1}') == set()           # dict equality: True == 1
    assert expected('{"a":true,"b":1}', '{"a":1,"b":2}') == {"$.a", "$.b"}
    assert expected("[1]", "[1.0]") == set()
    assert expected('["\\u0041"]', '["A"]') == set()
    assert expected('{"a":1,"a":2}', '{"a":3,"a":2}') == set()
    assert expected('{"a":1,"b":2}', '{"b":2,"a":1}') == set()
    assert expected('"[1,2]"', '"[1,3]"') == {"$[*]"}


# -- random values, mutated, serialized at random -----------------------------------------------

ASCII = st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=6)
JSON_LOOKING = st.sampled_from(['{"a":1}', '{"a":2}', "[1,2]", "[1]", "{", "[", "{}", "[]", "[x",
                                ' {"a":1}', "{ }"])
STRINGS = st.one_of(ASCII, JSON_LOOKING, st.sampled_from(["a", "b", "ts", "x y", ""]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000),
                    st.sampled_from([0, 1, -1, 10 ** 30, 2 ** 63]),
                    st.floats(allow_nan=False, allow_infinity=False, width=32), STRINGS)
KEYS = st.one_of(st.sampled_from(["a", "b", "id", "price", "odd key", "x-y", "$ref", "_", "1a", "",
                                  "a.b"]), ASCII)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=5)),
                      max_leaves=24)


def random_scalar(rng: random.Random):
    return rng.choice([None, True, False, rng.randint(-5, 5), rng.randint(-10 ** 6, 10 ** 6),
                       rng.random() * 100, "s" + str(rng.randint(0, 9)), '{"a":1}', "[1]", ""])


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return random_scalar(rng)
    if r < 0.75:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice("abcdxyz") + str(i): random_value(rng, depth + 1)
            for i in range(rng.randint(0, 3))}


def mutate(v, rng: random.Random, scalars_only: bool = False):
    """A copy of v with one random change somewhere."""
    if isinstance(v, dict) and v and (scalars_only or rng.random() < 0.6):
        k = rng.choice(list(v))
        out = dict(v)
        out[k] = mutate(v[k], rng, scalars_only)
        return out
    if isinstance(v, list) and v and (scalars_only or rng.random() < 0.6):
        i = rng.randrange(len(v))
        out = list(v)
        out[i] = mutate(v[i], rng, scalars_only)
        return out
    if scalars_only:
        if isinstance(v, (dict, list)):
            return v
        if isinstance(v, bool):
            return not v
        if isinstance(v, int):
            return v + rng.randint(1, 1000)
        if isinstance(v, str) and v[:1] not in ("{", "["):
            return v + "!"
        if v is None:
            return "now set"
        return v
    r = rng.random()
    if isinstance(v, dict):
        out = dict(v)
        if r < 0.2 and out:
            del out[rng.choice(list(out))]                          # drop a key
        elif r < 0.4:
            out["added" + str(rng.randint(0, 3))] = random_value(rng)   # add a key
        elif r < 0.6:
            items = list(out.items())                               # reorder
            rng.shuffle(items)
            out = dict(items)
        else:
            return random_value(rng)                                # swap the type
        return out
    if isinstance(v, list):
        if r < 0.3 and v:
            return v[:rng.randrange(len(v))]                        # shorten
        if r < 0.6:
            return v + [random_value(rng)]                          # lengthen
        return random_value(rng)
    if r < 0.2:
        return [v]
    if r < 0.3:
        return {"a": v}
    if isinstance(v, int) and not isinstance(v, bool) and r < 0.5:
        return float(v)                                             # 1 -> 1.0
    if isinstance(v, bool) and r < 0.6:
        return int(v)                                               # True -> 1
    return random_scalar(rng)


def dump(v, rng: random.Random, fancy: bool = True) -> str:
    """JSON text of v with random whitespace, number spellings and escapes (all valid JSON)."""
    def ws():
        return rng.choice(["", "", "", " ", "\n", "\t", "\r\n  "]) if fancy else ""

    def string(s):
        t = json.dumps(s)
        if fancy and rng.random() < 0.15 and len(t) > 2:
            i = rng.randrange(1, len(t) - 1)
            if t[i - 1] != "\\" and t[i] != "\\":
                t = t[:i] + "\\u%04x" % ord(t[i]) + t[i + 1:]      # the same string, escaped
        return t

    if isinstance(v, dict):
        if not v:
            return "{" + ws() + "}"
        return "{" + ",".join(ws() + string(k) + ws() + ":" + ws() + dump(x, rng, fancy) + ws()
                              for k, x in v.items()) + "}"
    if isinstance(v, list):
        if not v:
            return "[" + ws() + "]"
        return "[" + ",".join(ws() + dump(x, rng, fancy) + ws() for x in v) + "]"
    if isinstance(v, str):
        return string(v)
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, int):
        if fancy and rng.random() < 0.1:
            return rng.choice([f"{v}.0", f"{v}e0", f"{v}E+0", "-0" if v == 0 else str(v)])
        return str(v)
    if fancy and rng.random() < 0.2:
        return f"{v:e}"
    return json.dumps(v)


def check(a: str, b: str) -> bool:
    decided, paths = run_all(a, b)
    if decided:
        assert paths == expected(a, b), (a, b)
    return decided


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES, st.integers(0, 2 ** 32), st.integers(0, 3))
def test_differential_mutated(value, seed, changes):
    rng = random.Random(seed)
    other = value
    for _ in range(changes):
        other = mutate(other, rng)
    check(dump(value, rng), dump(other, rng))
    check(dump(value, rng, fancy=False), dump(other, rng, fancy=False))


@settings(max_examples=300, deadline=None)
@given(VALUES, st.integers(0, 2 ** 32))
def test_differential_same_value(value, seed):
    """The same value, spelled twice: never a difference unless a spelling makes it give up."""
    rng = random.Random(seed)
    a, b = dump(value, rng), dump(value, rng)
    if check(a, b):
        assert run_all(a, b)[1] == set()


@settings(max_examples=300, deadline=None)
@given(VALUES, st.integers(0, 2 ** 32), st.data())
def test_differential_damaged(value, seed, data):
    """Cut, extended or byte-edited texts: never decided unless both are JSON."""
    rng = random.Random(seed)
    a = dump(value, rng)
    b = dump(mutate(value, rng), rng)
    how = data.draw(st.sampled_from(["cut", "append", "edit"]))
    if how == "cut":
        b = b[:data.draw(st.integers(0, max(0, len(b) - 1)))]
    elif how == "append":
        b = b + data.draw(st.sampled_from([",", "]", "}", " x", "1", '"', "\x00", "\x7f", "{}"]))
    else:
        i = data.draw(st.integers(0, max(0, len(b) - 1)))
        b = b[:i] + data.draw(st.sampled_from(list(',:[]{}" \\0aetn-.\x01'))) + b[i + 1:]
    decided, paths = run_all(a, b)
    if decided:
        assert paths == expected(a, b)


def same_shape_corpus(n: int = 200):
    """Pairs of typical responses that differ in a few scalars (ints, plain strings, booleans,
    null turned string), serialized alike, with or without whitespace."""
    rng = random.Random(20240501)
    pairs = []
    for _ in range(n):
        v = {"id": rng.randint(1, 10 ** 6), "ts": f"2024-05-0{rng.randint(1, 9)}T10:00:00Z",
             "name": "item " + str(rng.randint(0, 99)), "active": rng.random() < 0.5,
             "rating": round(rng.random() * 5, 2), "note": None,
             "items": [{"sku": f"s{i}", "price": rng.randint(1, 999), "qty": rng.randint(1, 5),
                        "tags": ["a", "b"][:rng.randint(0, 2)]} for i in range(rng.randint(0, 4))],
             "meta": random_value(rng)}
        w = v
        for _ in range(rng.randint(1, 3)):
            w = mutate(w, rng, scalars_only=True)
        fancy = rng.random() < 0.5
        indent = rng.choice([None, 2])
        pairs.append((json.dumps(v, indent=indent) if not fancy else dump(v, rng, False),
                      json.dumps(w, indent=indent) if not fancy else dump(w, rng, False)))
    return pairs


def test_same_shape_pairs_are_decided():
    pairs = same_shape_corpus()
    decided = sum(check(a, b) for a, b in pairs)
    assert decided >= 0.8 * len(pairs), f"only {decided} of {len(pairs)} decided"


def test_implementation_reported():
    from replay import core
    assert core.json_diff is (pure.json_diff if compiled is None else compiled.json_diff)
