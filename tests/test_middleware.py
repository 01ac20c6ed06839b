"""Middleware: GoReplay's protocol over a long-running process, with well- and badly-behaved ones.

Every run goes through ``run()``, which fails instead of hanging when the pipes deadlock.
Middlewares are the examples in ``examples/``, small scripts written below, and sh/awk one-liners.
"""

from __future__ import annotations

import io
import random
import sys
import textwrap
import threading
import time

import pytest

from replay.errors import MiddlewareError, ReplayError, UsageError
from replay.events import F_REPLAYED, KIND_REQUEST, KIND_RESPONSE, Message
from replay.httpmsg import header_value, with_data
from replay.pipeline import open_input
from replay.rules.middleware import Middleware, message_id
from tests.conftest import ROOT

PY = sys.executable
EXAMPLES = ROOT / "examples"
CLIENT, SERVER = ("10.0.0.1", 40000), ("10.0.0.2", 80)
T0 = 1_700_000_000_000_000_000


def request(conn, index, method="GET", uri="/", body=b"", ts=None, flags=0):
    data = (f"{method} {uri} HTTP/1.1\r\nHost: example.test\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)
    ts = T0 + conn * 1000 + index * 10 if ts is None else ts
    return with_data(Message(KIND_REQUEST, conn, index, ts, ts, CLIENT, SERVER, flags, b""), data)


def response(conn, index, status=200, body=b"", ts=None, flags=0, method="GET"):
    data = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    ts = T0 + conn * 1000 + index * 10 + 5 if ts is None else ts
    return with_data(Message(KIND_RESPONSE, conn, index, ts, ts, CLIENT, SERVER, flags, b"", method, "/"), data)


def exchanges(n, methods=("GET",)):
    out = []
    for i in range(n):
        method = methods[i % len(methods)]
        out.append(request(i, 0, method, f"/{i}", b"b" * (i % 3) if method == "POST" else b""))
        out.append(response(i, 0, 200 + i % 5, method=method))
    return out


def run(mw, messages, timeout=20.0):
    """list(mw.map(messages)), failing if it takes longer than ``timeout`` (a deadlock)."""
    box = {}

    def target():
        try:
            box["out"] = list(mw.map(messages))
        except BaseException as e:  # noqa: BLE001
            box["err"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        mw.close()
        pytest.fail(f"middleware run did not finish in {timeout} s (stats {mw.stats})")
    if "err" in box:
        raise box["err"]
    return box["out"]


def mw_of(cmd, **kw):
    kw.setdefault("stderr", io.StringIO())
    return Middleware(cmd, **kw)


def py(script, *args):
    return " ".join([PY, str(script), *args])


SCRIPTS = {
    # reverses every batch of N lines (the last, short one at the end of input)
    "reverse": """
        import sys
        n = int(sys.argv[1]); batch = []
        for line in sys.stdin:
            batch.append(line)
            if len(batch) == n:
                sys.stdout.writelines(reversed(batch)); sys.stdout.flush(); batch = []
        sys.stdout.writelines(reversed(batch))
    """,
    # reads everything, then answers in reverse order (like tac)
    "sponge": """
        import sys
        sys.stdout.writelines(reversed(sys.stdin.readlines()))
    """,
    # a debug print on stdout after three answers
    "garbage": """
        import sys
        for i, line in enumerate(sys.stdin):
            if i == 3:
                sys.stderr.write("about to say hello\\n"); sys.stderr.flush()
                print("processing request", i)
            sys.stdout.write(line); sys.stdout.flush()
    """,
    "bad_meta": """
        import binascii, sys
        for line in sys.stdin:
            raw = binascii.unhexlify(line.strip())
            print(binascii.hexlify(b"9 x 1 2\\n" + raw.partition(b"\\n")[2]).decode(), flush=True)
    """,
    "no_meta": """
        import binascii, sys
        for line in sys.stdin:
            print(binascii.hexlify(b"hello").decode(), flush=True)
    """,
    # crashes with a traceback after five answers
    "crash": """
        import sys
        for i, line in enumerate(sys.stdin):
            if i == 5:
                sys.stderr.write("working on message 5\\n")
                1 / 0
            sys.stdout.write(line); sys.stdout.flush()
    """,
    "slow": """
        import sys, time
        for line in sys.stdin:
            time.sleep(float(sys.argv[1]))
            sys.stdout.write(line); sys.stdout.flush()
    """,
    # writes each decoded meta line to the file argv[1] and echoes
    "record": """
        import binascii, sys
        with open(sys.argv[1], "w") as f:
            for line in sys.stdin:
                meta = binascii.unhexlify(line.strip()).partition(b"\\n")[0]
                f.write(meta.decode() + "\\n"); f.flush()
                sys.stdout.write(line); sys.stdout.flush()
    """,
    # holds its first message until the fifth comes, then answers it first
    "hold_first": """
        import sys
        held = None
        for i, line in enumerate(sys.stdin):
            if i == 0:
                held = line; continue
            if i == 4:
                sys.stdout.write(held)
            sys.stdout.write(line); sys.stdout.flush()
    """,
    # echoes, and once answers with an id that was never sent
    "extra": """
        import binascii, sys
        for i, line in enumerate(sys.stdin):
            if i == 1:
                print(binascii.hexlify(b"1 ffffffffffffffffffffffff 1 -1\\nGET / HTTP/1.1\\r\\n\\r\\n").decode())
            sys.stdout.write(line); sys.stdout.flush()
    """,
    # echoes, then ignores the end of its input
    "linger": """
        import sys, time
        for line in sys.stdin:
            sys.stdout.write(line); sys.stdout.flush()
        time.sleep(60)
    """,
    # upper-case hex and CRLF line ends
    "upper_crlf": """
        import sys
        for line in sys.stdin:
            sys.stdout.write(line.strip().upper() + "\\r\\n\\n"); sys.stdout.flush()
    """,
    # the loop of the PyPI package gor (gor/base.py: parse_message and emit), without the package
    "gor_emulated": """
        import binascii, sys
        for line in sys.stdin:
            payload = binascii.unhexlify(line.strip()).decode()
            meta_pos = payload.index("\\n")
            raw_meta, http = payload[:meta_pos], payload[meta_pos + 1:]
            if raw_meta.split(" ")[0] == "1":
                http = http.replace("\\r\\n", "\\r\\nX-Gor: 1\\r\\n", 1)
            data = b"".join(binascii.hexlify(x.encode()) for x in [raw_meta, "\\n", http]) + b"\\n"
            sys.stdout.write(data.decode()); sys.stdout.flush()
    """,
}


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    d = tmp_path_factory.mktemp("middleware")
    paths = {}
    for name, body in SCRIPTS.items():
        p = d / f"{name}.py"
        p.write_text(textwrap.dedent(body))
        paths[name] = p
    return paths


# -- well-behaved middleware ----------------------------------------------------------------------

def test_echo_gives_back_the_same_messages():
    msgs = exchanges(50)
    with mw_of(py(EXAMPLES / "middleware_echo.py")) as mw:
        out = run(mw, msgs)
    assert len(out) == len(msgs) and all(a is b for a, b in zip(out, msgs))
    assert mw.stats["sent"] == mw.stats["returned"] == 100
    assert mw.stats["dropped"] == mw.stats["changed"] == 0


def test_echo_of_a_real_capture_and_stderr_passes_through():
    msgs = list(open_input(str(ROOT / "captures" / "sample.pcap")))
    err = io.StringIO()
    with Middleware(py(EXAMPLES / "middleware_echo.py", "-v"), stderr=err) as mw:
        out = run(mw, msgs)
    assert out == msgs
    lines = err.getvalue().splitlines()
    assert len(lines) == len(msgs) and all(line.startswith("replay: middleware: ") for line in lines)
    assert mw.stderr_tail == [line[len("replay: middleware: "):] for line in lines[-20:]]


def test_meta_line(scripts, tmp_path):
    """TYPE, ID shared by a request and its responses, TIMESTAMP ts_first, LATENCY from the request."""
    log = tmp_path / "meta.txt"
    req = request(7, 2, ts=T0 + 100)
    interim = response(7, 2, status=100, ts=T0 + 150)
    resp = response(7, 2, ts=T0 + 400)
    replayed_req = request(7, 2, ts=T0 + 10_000, flags=F_REPLAYED)
    replayed = response(7, 2, ts=T0 + 10_250, flags=F_REPLAYED)
    orphan1, orphan2 = response(8, -1, ts=T0 + 500), response(8, -1, ts=T0 + 600)
    lonely = response(9, 0, ts=T0 + 700)      # its request never went through
    msgs = [req, interim, resp, replayed_req, replayed, orphan1, orphan2, lonely]
    with mw_of(py(scripts["record"], str(log))) as mw:
        assert run(mw, msgs) == msgs
    metas = [line.split(" ") for line in log.read_text().splitlines()]
    assert all(len(m) == 4 for m in metas)
    ids = [m[1] for m in metas]
    assert [m[0] for m in metas] == ["1", "2", "2", "1", "3", "2", "2", "2"]
    assert ids[0] == "0000000000000007" "00000002" == message_id(7, 2).decode()
    assert len(set(ids[:5])) == 1 and all(len(i) == 24 for i in ids)
    assert ids[5] != ids[6] and ids[5].endswith("ffffffff") and ids[6].endswith("ffffffff")
    assert ids[7] not in ids[:7]
    assert [int(m[2]) for m in metas] == [m.ts_first for m in msgs]
    assert [int(m[3]) for m in metas] == [-1, 50, 300, -1, 250, -1, -1, -1]


def test_add_header_changes_the_head_only():
    msgs = [request(1, 0, "POST", "/a", b'{"k": 1}'), response(1, 0, body=b"ok"), request(2, 0, uri="/b")]
    with mw_of(py(EXAMPLES / "middleware_add_header.py", "'X-Shadow: yes'")) as mw:
        out = run(mw, msgs)
    assert mw.stats["changed"] == 2 and out[1] is msgs[1]
    for new, old in zip(out[::2], msgs[::2]):
        assert new.data.startswith(old.data.split(b"\r\n", 1)[0] + b"\r\nX-Shadow: yes\r\nHost:")
        assert header_value(new.data, new.head_length, b"x-shadow") == "yes"
        assert header_value(new.data, new.head_length, b"content-length") == str(old.body_length)
        assert new.head_length == old.head_length + len(b"X-Shadow: yes\r\n")
        assert new.data[new.head_length:] == old.data[old.head_length:]
        assert (new.method, new.uri, new.conn, new.index, new.ts_first) == \
               (old.method, old.uri, old.conn, old.index, old.ts_first)


def test_drop_post_drops_the_requests_and_their_responses():
    msgs = exchanges(30, methods=("GET", "POST", "PUT"))
    with mw_of(py(EXAMPLES / "middleware_drop_post.py")) as mw:
        out = run(mw, msgs)
    posts = {m.conn for m in msgs if m.method == "POST"}
    assert out == [m for m in msgs if m.conn not in posts]
    assert mw.stats["dropped"] == 2 * len(posts) == 20


@pytest.mark.parametrize("batch", [2, 7, 1000])
def test_answers_out_of_order_are_matched_by_id_and_type(scripts, batch):
    msgs = exchanges(40)
    msgs.insert(1, response(0, 0, status=100))        # an interim response: same id and type as the final
    with mw_of(py(scripts["reverse"], str(batch))) as mw:
        out = run(mw, msgs)
    assert sorted(map(id, out)) == sorted(map(id, msgs))
    assert out != msgs and mw.stats["returned"] == len(msgs) and mw.stats["changed"] == 0


def test_a_middleware_that_answers_after_reading_everything(scripts):
    msgs = exchanges(1000)
    with mw_of(py(scripts["sponge"])) as mw:
        out = run(mw, msgs)
    assert out == msgs[::-1]


def test_slow_middleware_loses_nothing(scripts):
    msgs = exchanges(15)
    with mw_of(py(scripts["slow"], "0.02"), idle_timeout=0.1) as mw:
        out = run(mw, msgs)
    assert out == msgs and mw.stats["dropped"] == 0


def test_upper_case_hex_and_crlf_are_accepted(scripts):
    msgs = exchanges(5)
    with mw_of(py(scripts["upper_crlf"])) as mw:
        assert run(mw, msgs) == msgs


def test_an_answer_matching_nothing_is_warned_about_and_ignored(scripts):
    msgs = exchanges(5)
    err = io.StringIO()
    with Middleware(py(scripts["extra"]), stderr=err) as mw:
        assert run(mw, msgs) == msgs
    assert mw.stats["unmatched"] == 1
    assert "matches no message in flight" in err.getvalue()


# -- other languages and the gor package ---------------------------------------------------------

@pytest.mark.parametrize("cmd", [
    "sh " + str(EXAMPLES / "middleware_echo.sh"),
    "awk '{ print; fflush() }'",
    "cat",
])
def test_shell_and_awk_echo(cmd):
    msgs = exchanges(200)
    with mw_of(cmd) as mw:
        assert run(mw, msgs) == msgs


@pytest.mark.parametrize("cmd, dropped_type", [
    ("awk '!/^32/ { print; fflush() }'", b"2"),                    # hex 32 = "2": recorded responses
    ("grep --line-buffered -v ^31", b"1"),                          # hex 31 = "1": requests
])
def test_one_liners_that_drop_a_type(cmd, dropped_type):
    msgs = exchanges(100)
    with mw_of(cmd) as mw:
        out = run(mw, msgs)
    kind = KIND_RESPONSE if dropped_type == b"2" else KIND_REQUEST
    assert out == [m for m in msgs if m.kind != kind] and mw.stats["dropped"] == 100


def test_gor_style_loop(scripts):
    msgs = exchanges(20)
    with mw_of(py(scripts["gor_emulated"])) as mw:
        out = run(mw, msgs)
    assert [m.conn for m in out] == [m.conn for m in msgs]
    assert all(header_value(m.data, m.head_length, b"x-gor") == "1" for m in out if m.kind == KIND_REQUEST)
    assert all(a is b for a, b in zip(out[1::2], msgs[1::2]))


def test_gor_package_example():
    pytest.importorskip("gor.middleware")
    msgs = exchanges(20)
    err = io.StringIO()
    with Middleware(py(EXAMPLES / "middleware_gor.py"), stderr=err) as mw:
        out = run(mw, msgs)
    assert sorted(m.conn for m in out) == sorted(m.conn for m in msgs)
    assert all(header_value(m.data, m.head_length, b"x-gor") == "1" for m in out if m.kind == KIND_REQUEST)
    assert mw.stats["changed"] == 20 and "replay: middleware: response " in err.getvalue()


# -- size and volume ------------------------------------------------------------------------------

def test_large_binary_payloads(scripts):
    rnd = random.Random(5)
    msgs = []
    for i in range(6):
        body = rnd.randbytes(1 << 20)
        msgs.append(request(i, 0, "POST", "/upload", body))
        msgs.append(response(i, 0, body=body[: 1 << 19]))
    with mw_of(py(EXAMPLES / "middleware_echo.py")) as mw:
        assert run(mw, msgs) == msgs
    with mw_of(py(EXAMPLES / "middleware_add_header.py")) as mw:
        out = run(mw, msgs)
    assert [m.data[m.head_length:] for m in out] == [m.data[m.head_length:] for m in msgs]
    with mw_of(py(scripts["reverse"], "5"), max_in_flight_bytes=3 << 20) as mw:
        out = run(mw, msgs)
    assert sorted(map(id, out)) == sorted(map(id, msgs))


@pytest.mark.parametrize("cmd", [py(EXAMPLES / "middleware_echo.py"), "awk '{ print; fflush() }'"])
def test_ten_thousand_messages(cmd):
    msgs = exchanges(5000)
    with mw_of(cmd) as mw:
        out = run(mw, msgs)
    assert len(out) == 10_000 and all(a is b for a, b in zip(out, msgs))


def test_in_flight_is_bounded(scripts):
    produced = []

    def source():
        for m in exchanges(200):
            produced.append(m)
            yield m

    with mw_of(py(EXAMPLES / "middleware_echo.py"), max_in_flight=10) as mw:
        it = mw.map(source())
        first = next(it)
        time.sleep(0.3)
        assert len(produced) <= 10 + 2      # the window, plus one waiting for room, plus one encoded
        rest = list(it)
    assert [first] + rest == produced


# -- streaming: drops known before the end of input -----------------------------------------------

def test_idle_timeout_counts_drops_while_input_is_still_open():
    gate = threading.Event()
    msgs = exchanges(4)

    def source():
        yield from msgs
        gate.wait(10)
        yield request(99, 0)

    # drops recorded responses: each counts dropped once a later message was answered 0.1 s ago
    # (grep, not awk: mawk reads its input in blocks and sees nothing until a block fills)
    with mw_of("grep --line-buffered -v ^32", idle_timeout=0.1) as mw:
        it = mw.map(source())
        got = [next(it) for _ in range(4)]
        rest = threading.Thread(target=lambda: got.extend(it), daemon=True)   # waits for the fifth
        rest.start()
        deadline = time.monotonic() + 5
        while mw.stats["dropped"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert mw.stats["dropped"] == 3        # the last response has no later answer yet
        gate.set()
        rest.join(10)
    assert got == msgs[::2] + [got[-1]] and got[-1].conn == 99
    assert mw.stats["dropped"] == 4


def test_a_late_answer_is_still_delivered(scripts):
    msgs = exchanges(4)

    def source():
        yield from msgs[:4]
        while mw.stats["returned"] < 3:        # answers to the 2nd-4th: the 1st looks dropped ...
            time.sleep(0.01)
        time.sleep(0.4)                         # ... and is counted so after 0.1 s
        yield from msgs[4:]

    with mw_of(py(scripts["hold_first"]), idle_timeout=0.1) as mw:
        out = run(mw, source())
    assert sorted(map(id, out)) == sorted(map(id, msgs)) and out[0] is msgs[1]
    assert mw.stats["late"] == 1 and mw.stats["dropped"] == 0


# -- failures -------------------------------------------------------------------------------------

def test_garbage_stops_with_the_line_and_stderr(scripts):
    with mw_of(py(scripts["garbage"])) as mw:
        with pytest.raises(MiddlewareError) as ei:
            run(mw, exchanges(10))
    text = str(ei.value)
    assert "\n" not in text and "not hex" in text and "'processing request 3'" in text
    assert "about to say hello" in text and str(scripts["garbage"]) in text


def test_garbage_skipped_passes_everything_through(scripts):
    msgs = exchanges(10)
    err = io.StringIO()
    with Middleware(py(scripts["garbage"]), on_error="skip", stderr=err) as mw:
        out = run(mw, msgs)
    assert out == msgs                     # an echo: the order is kept either way
    warnings = [line for line in err.getvalue().splitlines() if line.startswith("replay: warning:")]
    assert len(warnings) == 1 and warnings[0].endswith("; going on without it")
    assert "not hex" in warnings[0] and mw.stats["passed"] >= 17


@pytest.mark.parametrize("script, words", [("bad_meta", "bad meta line '9 x 1 2'"), ("no_meta", "no meta line")])
def test_bad_meta(scripts, script, words):
    with mw_of(py(scripts[script])) as mw:
        with pytest.raises(MiddlewareError, match=words):
            run(mw, exchanges(3))


def test_crash_mid_stream_stops_with_its_traceback(scripts):
    with mw_of(py(scripts["crash"])) as mw:
        with pytest.raises(MiddlewareError) as ei:
            run(mw, exchanges(50))
    text = str(ei.value)
    assert "exited with status 1" in text and "after answering 5 of 100 messages" in text
    assert "ZeroDivisionError: division by zero" in text and "working on message 5" in text


def test_crash_mid_stream_skipped(scripts):
    msgs = exchanges(50)
    err = io.StringIO()
    with Middleware(py(scripts["crash"]), on_error="skip", stderr=err) as mw:
        out = run(mw, msgs)
    assert out == msgs and mw.stats["returned"] == 5
    assert err.getvalue().count("replay: warning:") == 1
    assert "ZeroDivisionError" in err.getvalue()


def test_exit_before_the_end_of_input():
    with mw_of("head -n 3") as mw:
        with pytest.raises(MiddlewareError, match=r"exited with status 0 before the end of input, "
                                                  r"after answering \d+ of \d+ messages"):
            run(mw, exchanges(5000))


def test_exit_before_the_end_of_input_skipped():
    msgs = exchanges(3000)
    err = io.StringIO()
    with Middleware("head -n 3", on_error="skip", stderr=err) as mw:
        out = run(mw, msgs)
    assert out == msgs and mw.stats["returned"] == 3 and mw.stats["dropped"] == 0
    assert err.getvalue().count("replay: warning:") == 1


def test_a_middleware_that_stops_reading():
    with mw_of("sh -c 'exec 0<&-; echo closing >&2; sleep 30'", grace=0.2) as mw:
        with pytest.raises(MiddlewareError, match="stopped reading its stdin; its stderr ended with: closing"):
            run(mw, exchanges(2000))          # more than a pipe holds: a write fails
    assert mw.proc.poll() is not None


def test_non_zero_exit_at_the_end():
    msgs = exchanges(3)
    with mw_of("sh -c 'cat; echo bye >&2; exit 3'") as mw:
        with pytest.raises(MiddlewareError, match="exited with status 3 at the end of its input, after answering 6 of 6 messages; "
                                               "its stderr ended with: bye$"):
            run(mw, msgs)
    with mw_of("sh -c 'cat; exit 3'", on_error="skip") as mw:
        assert run(mw, msgs) == msgs


def test_cannot_start(tmp_path):
    with pytest.raises(MiddlewareError, match="cannot start middleware 'no-such-middleware-x': no such command"):
        Middleware("no-such-middleware-x")
    script = tmp_path / "mw.py"
    script.write_text("print('hi')\n")
    script.chmod(0o644)
    with pytest.raises(MiddlewareError, match="permission denied .* 'python3 .*mw.py'"):
        Middleware(str(script))
    script.chmod(0o755)
    with pytest.raises(MiddlewareError, match="Exec format error .no '#!' line"):
        Middleware(str(script))
    err = io.StringIO()
    mw = Middleware("no-such-middleware-x", on_error="skip", stderr=err)
    msgs = exchanges(3)
    assert run(mw, msgs) == msgs and "going on without it" in err.getvalue()
    assert mw.stats["passed"] == 6


@pytest.mark.parametrize("cmd, words", [("", "empty"), ("python3 'unclosed", "No closing quotation")])
def test_bad_command_is_a_usage_error(cmd, words):
    with pytest.raises(UsageError, match=words) as ei:
        Middleware(cmd)
    assert ei.value.exit_code == 2
    with pytest.raises(UsageError):
        Middleware("cat", on_error="retry")


def test_errors_are_replay_errors():
    assert issubclass(MiddlewareError, ReplayError)


def test_input_error_comes_after_what_was_answered():
    msgs = exchanges(3)

    def source():
        yield from msgs
        raise ValueError("torn input")

    mw = mw_of("cat")
    got = []
    with pytest.raises(ValueError, match="torn input"):
        for m in mw.map(source()):
            got.append(m)
    assert got == msgs


# -- ending ---------------------------------------------------------------------------------------

def test_stopping_early_ends_the_process():
    mw = mw_of("cat")
    it = mw.map(iter(exchanges(1000)))
    next(it)
    it.close()
    assert mw.proc.poll() is not None


@pytest.mark.parametrize("cmd", ["linger", "sh -c 'cat; sleep 30'", "sh -c 'cat | cat; sleep 30'"])
def test_a_middleware_that_lingers_after_its_input_is_killed(scripts, cmd):
    """Once every message is answered the run ends; its process group gets ``grace`` seconds."""
    msgs = exchanges(3)
    t = time.monotonic()
    with mw_of(py(scripts[cmd]) if cmd in scripts else cmd, grace=0.2) as mw:
        assert run(mw, msgs) == msgs
    assert mw.proc.poll() is not None and time.monotonic() - t < 3
    assert mw.exit_status is None          # it did not exit by itself


def test_map_runs_once():
    with mw_of("cat") as mw:
        run(mw, exchanges(1))
        with pytest.raises(RuntimeError):
            list(mw.map([]))


def test_a_middleware_that_never_answers_nor_exits_cannot_hold_the_run(tmp_path):
    """Rule (e): after the end of input, idle_timeout + grace of silence drops what is left."""
    script = tmp_path / "hold.py"
    script.write_text("import sys, time\nfor line in sys.stdin:\n    pass\ntime.sleep(60)\n")
    msgs = exchanges(3)
    t0 = time.monotonic()
    with Middleware(f"{sys.executable} {script}", idle_timeout=0.3, grace=0.5) as mw:
        out = list(mw.map(msgs))
    assert out == [] and mw.stats["dropped"] == len(msgs)
    assert time.monotonic() - t0 < 10
