"""Captured traffic through Kafka (``replay.kafka``, ``replay.play.kafka``), against a real
Kafka-protocol broker on loopback (``kafka_broker.py``: Tansu, in memory).

The record encoding round-trips every field and refuses what is not a record; a capture
converted to a topic comes back the same; two replayers in one consumer group replay every
request exactly once against one sink, each recorded connection on one replayer and in order, and
the group's committed offsets reach the end of every partition; ``--until`` bounds a read and
the group's next run resumes there; a replayer killed mid-way is replaced by the other with
nothing lost; ``--start-at``/``--t0`` put requests on the agreed timeline; the two replayers'
logs merge in ``report`` and ``info``; undelivered records (a broker down from the start, a
broker that goes away) and a corrupt record end in one line and a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
import time

import pytest
from kafka_broker import GROUP, Broker, free_port
from play_helpers import SAMPLE, SinkThread, env, get, ok_response, replay_cmd, write_capture

from replay.errors import OutputError, UsageError
from replay.events import Message
from replay.kafka import parse_settings, parse_time, parse_url
from replay.kafka import record as R
from replay.log import LogReader

MS = 1_000_000
T0 = 1_700_000_000_000_000_000
_topics = iter(range(1, 10_000))


def topic_name(what: str) -> str:
    return f"{what}-{next(_topics)}-{time.monotonic_ns() % 1_000_000}"


def at(ns: int) -> str:
    """``ns`` as an exact @UNIX_SECONDS time."""
    return f"@{ns // 10 ** 9}.{ns % 10 ** 9:09d}"


def run(args, timeout=90, **kw):
    return subprocess.run(replay_cmd() + args, capture_output=True, text=True, env=env(),
                          timeout=timeout, **kw)


def one_line_error(p, *needles):
    """A failed run: its last stderr line says what went wrong; no traceback."""
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, p.stderr
    return last


# -- without a broker ------------------------------------------------------------------------

MESSAGES = [
    Message(0, 5, 2, T0, T0 + 7, ("10.0.0.1", 40000), ("10.0.0.2", 80), 0,
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", "GET", "/a", 0, 0, 28),
    Message(1, 5, 2, T0 + 9, T0 + 12, ("10.0.0.1", 40000), ("10.0.0.2", 80), 1 << 7,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "GET", "/a",
            200, 0, 47),
    Message(1, 1 << 63, -1, -5, 0, ("::1", 0), ("fe80::1", 65535), 0x1FFF, b"", None, None,
            599, 1 << 40, 0),
    Message(0, 0, 0, 0, 0, ("", 1), ("h", 2), 0, bytes(range(256)) * 3, "M\u00e9", "/\udcff", 0,
            0, 0),
]


@pytest.mark.parametrize("m", MESSAGES)
def test_record_round_trip(m):
    assert R.decode(R.encode(m)) == m
    assert R.split_key(R.key(b"12345678", m.conn)) == (b"12345678", m.conn)


@pytest.mark.parametrize("buf, why", [
    (b"", "bad magic"),
    (b"XX\x01" + b"\0" * 60, "bad magic"),
    (b"RK\x09" + b"\0" * 60, "version 9"),
    (b"RK\x01\x00", "cut short"),
    (R.encode(MESSAGES[0])[:R.HEAD.size + 3], "bad record header"),
])
def test_record_refused(buf, why):
    with pytest.raises(R.RecordError, match=why):
        R.decode(buf)
    with pytest.raises(R.RecordError):
        R.split_key(b"short")


@pytest.mark.parametrize("url, why", [
    ("kafka://", "no topic"), ("kafka://h:1", "no topic"), ("kafka:///t", "no broker"),
    ("kafka://h/t", "bad broker address"), ("kafka://h:0/t", "bad broker address"),
    ("kafka://h:1/a b", "bad topic name"), ("http://h:1/t", "not a kafka:// address"),
])
def test_bad_url(url, why):
    with pytest.raises(UsageError, match=why):
        parse_url(url)


def test_url_settings_and_times():
    u = parse_url("kafka://b1:9092,[::1]:9093/prod-http")
    assert (u.brokers, u.topic) == ("b1:9092,[::1]:9093", "prod-http")
    assert parse_settings(["a=1", "b=x=y", "a=2"]) == {"a": "2", "b": "x=y"}
    with pytest.raises(UsageError, match="key=value"):
        parse_settings(["novalue"])
    assert parse_time("2026-12-01T10:00:00Z", "x") == parse_time("@1796119200", "x") \
        == 1796119200 * 10 ** 9
    with pytest.raises(UsageError, match="--from: not a time"):
        parse_time("yesterday", "--from")


def test_cli_bad_input_one_line(tmp_path):
    p = run(["convert", str(SAMPLE), "-o", "kafka://nohost/t"])
    one_line_error(p, "bad broker address")
    assert p.returncode == 2
    p = run(["convert", str(SAMPLE), "-o", f"kafka://127.0.0.1:{free_port()}/t",
             "-X", "no.such.setting=1"])
    one_line_error(p, 'No such configuration property: "no.such.setting"')
    p = run(["play", "kafka://127.0.0.1:1/t", "--sink", "--from", "soon"])
    one_line_error(p, "--from: not a time")
    p = run(["play", str(SAMPLE), "--sink", "--group", "g"])
    one_line_error(p, "are for a kafka:// input")


# -- with a broker ---------------------------------------------------------------------------

def spread(path, conns=24, per=20, gap_ms=3):
    """``conns`` connections of ``per`` GETs each, interleaved in time; each URI names its
    connection and position: /c<conn>/r<i>."""
    items = []
    for c in range(conns):
        items.append([(T0 + (i * conns + c) * gap_ms * MS, get(f"/c{c}/r{i}"), ok_response())
                      for i in range(per)])
    return write_capture(path, items)


def test_convert_to_topic_and_back(kafka_broker, tmp_path):
    url = kafka_broker.create_topic(topic_name("sample"), 4)
    p = run(["convert", str(SAMPLE), "-o", url])
    assert p.returncode == 0, p.stderr
    assert "75 records delivered" in p.stderr
    recs = kafka_broker.records(url.rsplit("/", 1)[1])
    assert len(recs) == 75
    by_key = collections.defaultdict(set)
    for value, key, headers, part, _ in recs:
        by_key[key].add(part)
        h = dict(headers)
        assert h[R.H_KIND] in (b"request", b"response") and h[R.H_HOST]
    assert all(len(parts) == 1 for parts in by_key.values())     # a connection, one partition
    assert len({part for parts in by_key.values() for part in parts}) > 1

    local = tmp_path / "local.rlog"
    back = tmp_path / "back.rlog"
    assert run(["convert", str(SAMPLE), "-o", str(local)]).returncode == 0
    p = run(["convert", url, "-o", str(back)])
    assert p.returncode == 0, p.stderr

    def key(m):
        return (m.kind, m.index, m.ts_first, m.ts_last, m.client, m.server, m.flags, m.data,
                m.method, m.uri, m.status, m.body_length, m.head_length)

    a, b = list(LogReader(str(local))), list(LogReader(str(back)))
    assert sorted(map(key, a)) == sorted(map(key, b))
    assert [m.ts_last for m in b] == sorted(m.ts_last for m in b)   # merged in time order
    conns_a = collections.defaultdict(list)
    conns_b = collections.defaultdict(list)
    for m in a:
        conns_a[m.conn].append(key(m))
    for m in b:
        conns_b[m.conn].append(key(m))
    assert sorted(conns_a.values()) == sorted(conns_b.values())     # connections kept whole

    # --from/--until: by capture time (the broker's offset lookup is not trusted)
    ts = sorted(m.ts_first for m in a)
    mid = ts[len(ts) // 2]
    part = tmp_path / "part.rlog"
    p = run(["convert", url, "--from", at(mid), "--until", at(ts[-1] + 1), "-o", str(part)])
    assert p.returncode == 0, p.stderr
    got = list(LogReader(str(part)))
    assert got and all(mid <= m.ts_first <= ts[-1] for m in got)
    assert len(got) == sum(1 for m in a if m.ts_first >= mid)


def _play(url, sink, group, *extra):
    return subprocess.Popen(
        replay_cmd() + ["play", url, "--group", group, "--target", sink.url, "--speed", "max",
                        "--no-follow", *GROUP, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def _wait(procs, timeout=120):
    out = []
    end = time.monotonic() + timeout
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            pytest.fail(f"a replayer did not end: {e}")
        out.append((p.returncode, o, e))
    return out


def test_group_of_two_replayers_replays_each_request_once(kafka_broker, tmp_path):
    conns, per = 24, 20
    cap = spread(tmp_path / "spread.pcap", conns, per)
    url = kafka_broker.create_topic(topic_name("group"), 4)
    p = run(["convert", str(cap), "-o", url])
    assert p.returncode == 0, p.stderr
    with SinkThread() as sink:
        procs = [_play(url, sink, "staging", "--report", str(tmp_path / f"run{i}.json"),
                       "-o", str(tmp_path / f"run{i}.rlog")) for i in range(2)]
        results = _wait(procs)
        for code, out, err in results:
            assert code == 0, err
            assert "Traceback" not in err
        records = list(sink.records)
    # the offsets were committed: the group's position is past every record of every partition
    # (read with OffsetFetch: Tansu does not always let a new member into a group whose leader
    # left, so the resume itself is tested with one replayer, in test_bounded_until_and_resume)
    assert kafka_broker.committed(url, "staging") == kafka_broker.ends(url)
    uris = [raw.split(b" ", 2)[1].decode() for _, raw in records]
    assert sorted(uris) == sorted(f"/c{c}/r{i}" for c in range(conns) for i in range(per))
    # each recorded connection on one replay connection, its requests in recorded order
    by_sink_conn = collections.defaultdict(list)
    for rec, raw in records:
        by_sink_conn[rec["conn"]].append(raw.split(b" ", 2)[1].decode())
    seen = {}
    for sc, us in by_sink_conn.items():
        for u in us:
            c = int(re.match(r"/c(\d+)/", u).group(1))
            assert seen.setdefault(c, sc) == sc, f"connection {c} split over replay connections"
        for c in {int(re.match(r"/c(\d+)/", u).group(1)) for u in us}:
            idx = [int(u.rsplit("r", 1)[1]) for u in us if u.startswith(f"/c{c}/")]
            assert idx == sorted(idx)
    reports = [json.loads((tmp_path / f"run{i}.json").read_text()) for i in range(2)]
    assert sum(r["attempted"] for r in reports) == conns * per
    assert all(r["error_total"] == 0 for r in reports)
    # each recorded connection was replayed by one replayer (their -o logs share none)
    prefixes = [{m.uri.split("/r")[0] for m in LogReader(str(tmp_path / f"run{i}.rlog"))
                 if m.kind == 0} for i in range(2)]
    assert not prefixes[0] & prefixes[1]
    assert len(prefixes[0] | prefixes[1]) == conns
    # the two run logs as one: report and info merge them
    logs = [str(tmp_path / f"run{i}.rlog") for i in range(2)]
    singles = []
    for i, log in enumerate(logs + [None]):
        out = tmp_path / f"report{i}.json"
        p = run(["report", *([log] if log else logs), "--json", str(out), "-q"])
        assert p.returncode == 0, p.stderr
        singles.append(json.loads(out.read_text()))
    merged = singles.pop()
    assert merged["totals"]["exchanges"] == conns * per \
        == sum(r["totals"]["exchanges"] for r in singles)
    assert merged["merged_from"] == logs
    p = run(["info", *logs, "--json"])
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["requests"] == 2 * conns * per          # replayed and recorded
    assert info["flags"]["replayed"] == 2 * conns * per


def test_bounded_until_and_resume(kafka_broker, tmp_path):
    cap = spread(tmp_path / "spread.pcap", 4, 10, gap_ms=100)    # 4 s of traffic
    url = kafka_broker.create_topic(topic_name("bounded"), 2)
    assert run(["convert", str(cap), "-o", url]).returncode == 0
    cut = T0 + 2000 * MS
    with SinkThread() as sink:
        code, out, err = _wait([_play(url, sink, "bounded", "--until", at(cut))])[0]
        assert code == 0, err
        uris = sorted(raw.split(b" ", 2)[1].decode() for _, raw in sink.records)
    # request k (of conn c, position i) was recorded at T0 + (i*4 + c) * 100 ms
    want = sorted(f"/c{c}/r{i}" for c in range(4) for i in range(10)
                  if (i * 4 + c) * 100 * MS < 2000 * MS)
    assert uris == want
    # the same group again, to the end: it resumes where --until stopped, nothing twice
    with SinkThread() as sink:
        code, out, err = _wait([_play(url, sink, "bounded")])[0]
        assert code == 0, err
        rest = sorted(raw.split(b" ", 2)[1].decode() for _, raw in sink.records)
    assert sorted(uris + rest) == sorted(f"/c{c}/r{i}" for c in range(4) for i in range(10))


def test_broker_down_from_the_start_counts_undelivered(tmp_path):
    url = f"kafka://127.0.0.1:{free_port()}/nobody-home"
    t = time.monotonic()
    p = run(["convert", str(SAMPLE), "-o", url, "-X", "message.timeout.ms=1500"])
    last = one_line_error(p, url, "75 of 75 messages not delivered")
    assert p.returncode == 1 and time.monotonic() - t < 30, last
    # a consumer: the same, in one line
    p = run(["play", url, "--sink", "--no-follow"], timeout=60)
    one_line_error(p, url, "cannot reach the brokers")


def test_broker_that_goes_away(tmp_path):
    """Records written before the broker stopped are delivered; those after are counted, and
    ``close`` says how many, in one ``OutputError``."""
    from replay.kafka.producer import KafkaWriter

    b = Broker().start()
    try:
        url = b.create_topic("away", 2)
        w = KafkaWriter(url, {"message.timeout.ms": "1500", "linger.ms": "1"}, {"host": "h"})
        for i in range(50):
            w.write(MESSAGES[i % 2])
        w.producer.flush(10)
        assert w.failed == 0
    finally:
        b.stop()
    for i in range(30):
        w.write(MESSAGES[i % 2])
    with pytest.raises(OutputError, match=r"30 of 80 messages not delivered"):
        w.close()


def test_corrupt_record_one_line(kafka_broker, tmp_path):
    from confluent_kafka import Producer

    name = topic_name("corrupt")
    url = kafka_broker.create_topic(name, 1)
    pr = Producer({"bootstrap.servers": kafka_broker.address, "log_level": 0})
    pr.produce(name, R.encode(MESSAGES[0]), R.key(b"r" * 8, 1))
    pr.produce(name, b"garbage that is not a record", R.key(b"r" * 8, 1))
    pr.flush(10)
    p = run(["convert", url, "-o", str(tmp_path / "x.rlog")])
    one_line_error(p, url, "partition 0 offset 1", "bad magic")
    assert p.returncode == 2
    assert not (tmp_path / "x.rlog").exists()


def test_a_replayer_killed_midway_is_replaced(kafka_broker, tmp_path):
    """Two replayers follow the topic at the recorded pace; one is killed (SIGKILL) a third of
    the way: the other takes its partitions over from their committed offsets. Every request
    is replayed, and twice at most those the dead one tried after its last commit."""
    import signal

    conns, per = 8, 12
    cap = spread(tmp_path / "spread.pcap", conns, per, gap_ms=60)     # ~5.8 s of traffic
    url = kafka_broker.create_topic(topic_name("kill"), 4)
    assert run(["convert", str(cap), "-o", url]).returncode == 0
    with SinkThread() as sink:
        procs = [subprocess.Popen(
            replay_cmd() + ["play", url, "--group", "takeover", "--target", sink.url,
                            "--duration", "14", "--report", str(tmp_path / f"k{i}.json"),
                            *GROUP],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
            for i in range(2)]
        end = time.monotonic() + 30
        while len(sink.records) < conns * per // 3 and time.monotonic() < end:
            time.sleep(0.05)
        assert len(sink.records) >= conns * per // 3, "the replay did not start"
        procs[1].send_signal(signal.SIGKILL)
        results = _wait(procs, timeout=60)
        assert results[0][0] == 0, results[0][2]
        assert "Traceback" not in results[0][2]
        uris = collections.Counter(raw.split(b" ", 2)[1].decode() for _, raw in sink.records)
    want = {f"/c{c}/r{i}" for c in range(conns) for i in range(per)}
    assert set(uris) == want                      # nothing lost
    twice = sum(n - 1 for n in uris.values())
    assert max(uris.values()) <= 2 and twice < conns * per // 2, uris


def test_many_requests_at_full_speed(kafka_broker, tmp_path):
    """Enough requests that the acknowledgements and the planned requests fill both pipes
    between the sender and its reading process at once (a deadlock before the acknowledgements
    were made non-blocking): all replayed, the offsets committed to the end."""
    from replay.kafka.producer import KafkaWriter

    n, conns = 12_000, 32
    url = kafka_broker.create_topic(topic_name("many"), 4)
    w = KafkaWriter(url, {}, {"host": "bench"})
    for k in range(n):
        c, t = k % conns, T0 + k * 100_000
        req = get(f"/m/{k}")
        resp = ok_response()
        w.write(Message(0, c, k // conns, t, t, ("10.0.0.1", 40000 + c), ("10.0.0.2", 80), 0,
                        req, "GET", f"/m/{k}", 0, 0, len(req)))
        w.write(Message(1, c, k // conns, t + 50_000, t + 50_000, ("10.0.0.1", 40000 + c),
                        ("10.0.0.2", 80), 0, resp, "GET", f"/m/{k}", 200, 5, len(resp) - 5))
    w.close()
    with SinkThread() as sink:
        code, out, err = _wait([_play(url, sink, "many", "-q")])[0]
        assert code == 0, err
        assert len(sink.records) == n
    assert kafka_broker.committed(url, "many") == kafka_broker.ends(url)


def test_what_the_rules_leave_out_is_committed_at_the_end(kafka_broker, tmp_path):
    """A bounded read that reaches its end commits past the requests its rules left out (they
    were dealt with: dropped); the group's next run starts after them."""
    cap = spread(tmp_path / "spread.pcap", 4, 5)
    url = kafka_broker.create_topic(topic_name("rules"), 2)
    assert run(["convert", str(cap), "-o", url]).returncode == 0
    with SinkThread() as sink:
        code, out, err = _wait([_play(url, sink, "rules", "--path-include", "^/c[01]/")])[0]
        assert code == 0, err
        uris = sorted(raw.split(b" ", 2)[1].decode() for _, raw in sink.records)
    assert uris == sorted(f"/c{c}/r{i}" for c in (0, 1) for i in range(5))
    assert kafka_broker.committed(url, "rules") == kafka_broker.ends(url)


def test_agreed_schedule_pins_start_and_t0():
    from replay.play.kafka import AgreedSchedule

    s = AgreedSchedule(0, 0, 0, speed=2.0, start_unix_ns=time.time_ns() + 5 * 10 ** 9,
                       t0_ns=T0)
    s.t0 = T0 + 123                 # what the sender would set from the first request read
    s.start = time.monotonic_ns()   # ... and from its own clock
    assert s.t0 == T0
    assert abs(s.start - (time.monotonic_ns() + 5 * 10 ** 9)) < 50 * MS
    assert s.deadline(T0 + 2 * 10 ** 9, 0) == s.start + 10 ** 9
    free = AgreedSchedule(0, 0, 0, speed=1.0, margin_ns=3 * 10 ** 9)
    free.t0 = T0 + 5
    free.start = 1000
    assert (free.t0, free.start) == (T0 + 5, 1000 + 3 * 10 ** 9)


def test_start_at_and_t0_put_requests_on_the_agreed_timeline(kafka_broker, tmp_path):
    """--start-at and --t0: request k, recorded at T0 + d_k, reaches the target at
    start-at + d_k (as the sink's clock sees it), whatever this replayer read first."""
    cap = spread(tmp_path / "spread.pcap", 2, 4, gap_ms=100)       # 0 .. 700 ms
    url = kafka_broker.create_topic(topic_name("agreed"), 2)
    assert run(["convert", str(cap), "-o", url]).returncode == 0
    start = time.time_ns() + 4 * 10 ** 9            # room for the group join
    with SinkThread() as sink:
        code, out, err = _wait([_play(url, sink, "agreed", "--speed", "1", "--start-at",
                                      at(start), "--t0", at(T0 - 500 * MS),
                                      "--path-include", "/r[1-3]$")])[0]
        assert code == 0, err
        got = {raw.split(b" ", 2)[1].decode(): rec["ts"] for rec, raw in sink.records}
    assert len(got) == 6
    for uri, ts in got.items():
        c, i = map(int, re.match(r"/c(\d+)/r(\d+)", uri).groups())
        due = start + 500 * MS + (i * 2 + c) * 100 * MS
        assert abs(ts * 1e9 - due) < 30 * MS, (uri, ts * 1e9 - due)


def test_review_cases_bad_times_same_topic_empty_topic_and_until_while_following(kafka_broker,
                                                                                   tmp_path):
    """Times out of range are one line; a topic converted into itself is refused; an empty topic
    replayed to its end is 'no requests'; --until ends a followed read once it is past."""
    url = kafka_broker.create_topic(topic_name("review"), 2)
    for bad in ("1e30", "Infinity", "0001-01-01T00:00:00"):
        p = run(["convert", url, "--from", bad, "-o", str(tmp_path / "x.rlog")])
        one_line_error(p, "--from: not a time between 1970 and 2116")
        assert p.returncode == 2
    p = run(["play", url, "--sink", "--start-at", "2100-01-01T00:00:00Z"])
    one_line_error(p, "more than a day ahead")
    p = run(["convert", url, "-o", url])
    one_line_error(p, "the topic read is the one written")
    p = run(["play", url, "--sink", "--no-follow"], timeout=60)
    one_line_error(p, "no requests to replay")
    cap = spread(tmp_path / "spread.pcap", 3, 4, gap_ms=50)
    assert run(["convert", str(cap), "-o", url]).returncode == 0
    # followed (the default), bounded by --until long past on the wall clock: it ends
    with SinkThread() as sink:
        p = run(["play", url, "--target", sink.url, "--speed", "max", "--until",
                 at(T0 + 300 * MS)], timeout=60)
        assert p.returncode == 0, p.stderr
        uris = sorted(raw.split(b" ", 2)[1].decode() for _, raw in sink.records)
    assert uris == sorted(f"/c{c}/r{i}" for c in range(3) for i in range(4)
                          if (i * 3 + c) * 50 * MS < 300 * MS)


def test_a_full_producer_queue_does_not_stall_each_write(tmp_path):
    """With the broker away and the bounded queue full, the first write waits (up to its
    block time) and the next ones are counted as not delivered at once."""
    from replay.kafka.producer import KafkaWriter
    from replay.pipeline import open_input

    w = KafkaWriter(f"kafka://127.0.0.1:{free_port()}/full", {"queue.buffering.max.messages": "5",
                                                             "message.timeout.ms": "2000"},
                    {}, block=0.5)
    msgs = list(open_input(str(SAMPLE)))[:40]
    t = time.monotonic()
    for m in msgs:
        w.write(m)
    took = time.monotonic() - t
    assert took < 5, took          # one wait of 0.5 s, not one per message (17 s)
    assert w.failed >= 30 and w.reasons["local queue full"] >= 30
    w.abandon()
    assert w.warnings and "not delivered" in w.warnings[-1]
