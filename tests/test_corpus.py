"""Real captures against the truth tshark computes for them.

``tests/data`` holds small BSD/MIT captures with their oracle (see tests/data/PROVENANCE.md), so
this runs anywhere; the whole public corpus in ``../shared/corpus`` is checked when it is present.
A capture matches when the multiset of requests' ``(method, uri)`` and of non-1xx response statuses
equal tshark's, with its default settings or with out-of-order reassembly (the corpus README).
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from replay.events import F_GAP, F_INCOMPLETE, KIND_REQUEST
from replay.pipeline import CaptureReader
from tests.conftest import CORPUS, DATA

# Where tshark misses a response that the capture shows: the response's head was captured, but a
# segment of its body was not, so tshark cannot reassemble the message and does not report it.
# replay reports it, flagged incomplete and gap.  name -> responses tshark misses
TSHARK_MISSES = {
    "zeek_zeek_bro.org.pcap": 1,                    # tcp.stream 2: head in frame 97, hole before 179
    "chrissanders_packets_http_espn.pcapng": 1,     # tcp.stream 3: trv_detroit_134.jpg, head in frame 893 after a hole
}


def oracle(path: Path, cols):
    out = Counter()
    if not path.exists():
        return None
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            out[tuple(row[c] or "" for c in cols)] += 1
    return out


def truth(odir: Path, name: str):
    req = oracle(odir / f"{name}.requests.msgs.tsv", ["http.request.method", "http.request.uri"])
    resp = oracle(odir / f"{name}.responses.msgs.tsv", ["http.response.code"])
    if resp is not None:
        resp = Counter({k: v for k, v in resp.items() if not k[0].startswith("1")})
    return req, resp


def ours(path: Path):
    req, resp, extra = Counter(), Counter(), Counter()
    for m in CaptureReader(str(path)):
        if m.kind == KIND_REQUEST:
            req[(m.method or "", m.uri or "")] += 1
        elif not 100 <= m.status < 200:
            resp[(str(m.status),)] += 1
            if m.flags & F_GAP and m.flags & F_INCOMPLETE:
                extra[(str(m.status),)] += 1
    return req, resp, extra


def check(pcap: Path, odir: Path):
    name = pcap.name
    req, resp, cut = ours(pcap)
    variants = [truth(odir, name), truth(odir / "ooo", name)]
    for t_req, t_resp in variants:
        if t_req is None:
            continue
        if req == t_req and resp == t_resp:
            return
    t_req, t_resp = variants[0]
    assert req == t_req, f"{name}: requests differ from tshark's"
    missed = resp - t_resp
    assert not (t_resp - resp), f"{name}: responses tshark found are missing: {t_resp - resp}"
    # the only responses allowed beyond tshark's are cut ones it could not reassemble
    assert sum(missed.values()) == TSHARK_MISSES.get(name, 0), f"{name}: extra responses {missed}"
    assert not (missed - cut), f"{name}: extra responses that are not cut: {missed - cut}"


LOCAL = sorted(p for p in DATA.glob("*.pcap*"))


@pytest.mark.parametrize("pcap", LOCAL, ids=[p.name for p in LOCAL])
def test_local_capture_matches_tshark(pcap, impl, monkeypatch):
    monkeypatch.setattr("replay.core.Engine", impl.Engine)
    check(pcap, DATA / "oracle")


def _corpus_files():
    if not (CORPUS / "pcaps").is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no corpus at {CORPUS}"))]
    return sorted((CORPUS / "pcaps").iterdir())


@pytest.mark.parametrize("pcap", _corpus_files(), ids=lambda p: p.name if p else "absent")
def test_corpus_capture_matches_tshark(pcap, impl, monkeypatch):
    monkeypatch.setattr("replay.core.Engine", impl.Engine)
    check(pcap, CORPUS / "oracle")


def test_pipelined_requests_tshark_misses_are_found():
    """The two OISF pipelining captures: every request in a multi-request segment is listed."""
    p = DATA / "OISF_suricata-verify_ruletype-firewall-88-default-accept-tx-pipeline.pcap"
    msgs = list(CaptureReader(str(p)))
    reqs = [m for m in msgs if m.kind == KIND_REQUEST]
    resps = [m for m in msgs if m.kind != KIND_REQUEST]
    assert len(reqs) >= 2 and len(resps) == len(reqs)
    assert [r.index for r in resps] == [q.index for q in reqs]
    assert all(r.uri == q.uri for r, q in zip(resps, reqs))
