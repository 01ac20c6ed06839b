"""Python hooks (--plugin): loading specs, keep / change / drop, and one-line errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from replay.errors import PluginError, PluginSpecError, UsageError
from replay.events import KIND_REQUEST
from replay.httpmsg import header_value
from replay.rules.plugins import apply_plugins, load_plugins
from tests.test_middleware import exchanges, request

HOOKS = """
    from replay.httpmsg import with_data

    def drop_post(msg):
        if msg.method == "POST" and msg.kind == 0:
            return None
        return msg

    def tag(msg):
        if msg.kind != 0:
            return msg
        line, rest = msg.data.split(b"\\r\\n", 1)
        return line + b"\\r\\nX-Hook: 1\\r\\n" + rest

    def in_place(msg):
        msg.data = msg.data.replace(b"GET /", b"GET /v2/", 1)
        return msg

    def same_bytes(msg):
        return bytes(msg.data)

    def boom(msg):
        if msg.conn == 3:
            raise ValueError("boom")
        return msg

    def wrong(msg):
        return "GET / HTTP/1.1"

    class Redactor:
        @staticmethod
        def apply(msg):
            return with_data(msg, msg.data.replace(b"example.test", b"redacted"))

    NOT_A_FUNCTION = 42
"""


@pytest.fixture
def hooks_file(tmp_path):
    p = tmp_path / "my_hooks.py"
    p.write_text(textwrap.dedent(HOOKS))
    return p


def test_file_spec_keep_change_drop(hooks_file):
    msgs = exchanges(6, methods=("GET", "POST"))
    plugins = load_plugins([f"{hooks_file}:drop_post", f"{hooks_file}:tag"])
    stats = {}
    out = list(apply_plugins(msgs, plugins, stats))
    assert [m.conn for m in out] == [0, 0, 1, 2, 2, 3, 4, 4, 5]    # POST requests gone, responses kept
    for m in out:
        if m.kind == KIND_REQUEST:
            assert header_value(m.data, m.head_length, b"x-hook") == "1" and m.method == "GET"
        else:
            assert any(m is o for o in msgs)
    assert stats == {"dropped": 3, "changed": 3}


def test_module_spec_from_the_current_directory_and_dotted_names(hooks_file, monkeypatch):
    monkeypatch.chdir(hooks_file.parent)
    monkeypatch.delitem(sys.modules, "my_hooks", raising=False)
    (p,) = load_plugins(["my_hooks:Redactor.apply"])
    (m,) = apply_plugins([request(1, 0)], [p])
    assert b"Host: redacted\r\n" in m.data and m.head_length == len(m.data)
    sys.modules.pop("my_hooks", None)


def test_a_hook_that_edits_the_message_in_place_gets_its_fields_recomputed(hooks_file):
    (m,) = apply_plugins([request(1, 0, uri="/a?b=1")], load_plugins([f"{hooks_file}:in_place"]))
    assert (m.uri, m.method) == ("/v2/a?b=1", "GET") and m.head_length == len(m.data)


def test_unchanged_bytes_keep_the_same_message(hooks_file):
    msgs = exchanges(2)
    stats = {}
    out = list(apply_plugins(msgs, load_plugins([f"{hooks_file}:same_bytes"]), stats))
    assert all(a is b for a, b in zip(out, msgs)) and stats == {"dropped": 0, "changed": 0}


def test_a_callable_and_no_plugins():
    msgs = exchanges(2)
    assert list(apply_plugins(msgs, [])) == msgs
    (p,) = load_plugins([lambda m: None])
    assert list(apply_plugins(msgs, [p])) == []


def test_the_same_file_loads_once(hooks_file):
    a, b = load_plugins([f"{hooks_file}:tag", f"{hooks_file}:boom"])
    assert a.fn.__globals__ is b.fn.__globals__


@pytest.mark.parametrize("spec, words", [
    ("my_hooks", "expected module:function or path/to/file.py:function"),
    ("no_such_module_x:f", "no module named 'no_such_module_x'"),
    ("{dir}/missing.py:f", "no such file {dir}/missing.py"),
    ("{file}:nope", "has no function 'nope'"),
    ("{file}:Redactor.nope", "has no function 'Redactor.nope'"),
    ("{file}:NOT_A_FUNCTION", "NOT_A_FUNCTION is int, not a function"),
    ("{dir}/broken.py:f", "importing {dir}/broken.py failed: SyntaxError"),
    ("{dir}/needs.py:f", "importing {dir}/needs.py failed: ModuleNotFoundError: No module named 'not_installed_x'"),
])
def test_bad_specs_are_one_line_usage_errors(hooks_file, spec, words):
    d = hooks_file.parent
    (d / "broken.py").write_text("def f(:\n")
    (d / "needs.py").write_text("import not_installed_x\ndef f(m):\n    return m\n")
    spec = spec.format(dir=d, file=hooks_file)
    with pytest.raises(PluginSpecError) as ei:
        load_plugins(["json:loads", spec])
    text = str(ei.value)
    assert text.startswith(f"plugin {spec!r}: ") and words.format(dir=d) in text and "\n" not in text
    assert isinstance(ei.value, UsageError) and ei.value.exit_code == 2


def test_a_hook_that_raises_stops_with_one_line(hooks_file):
    spec = f"{hooks_file}:boom"
    got = []
    with pytest.raises(PluginError) as ei:
        for m in apply_plugins(exchanges(6), load_plugins([spec])):
            got.append(m)
    assert len(got) == 6
    text = str(ei.value)
    line = hooks_file.read_text().splitlines().index('        raise ValueError("boom")') + 1
    assert text == f"plugin {spec!r} raised ValueError: boom at my_hooks.py:{line} on request conn 3 index 0 (GET /3)"
    assert isinstance(ei.value.__cause__, ValueError)


def test_a_hook_that_returns_a_wrong_type(hooks_file):
    spec = f"{hooks_file}:wrong"
    with pytest.raises(PluginError, match=r"returned str on request conn 0 index 0 \(GET /0\); expected a Message, "
                                          r"bytes \(the new message\) or None \(to drop it\)"):
        list(apply_plugins(exchanges(1), load_plugins([spec])))
