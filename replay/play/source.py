"""Where a replay's requests come from: a log or capture file, planned before the run.

``RecordedSource`` reads the file once to plan (``plan.build_plan``, after the rules: filters,
rewrites, middleware, plugins), and once more after the run to hand the recorded exchanges of
what was replayed to the output log (``session.ExchangeLog``), so that ``replay report`` and
``replay ls`` find each recorded answer beside the new one.

Rules:
- the plan is built from the messages the rules let through; with a rule that sets Host
  (``--set-header 'Host: ...'``) the recorded Host is kept, as with ``--keep-host``;
- the recorded exchanges go through the rules' rewrites again (``--redact`` hides their secrets
  as it did in the plan), never through the filters: they are chosen by ``(conn, index)``, the
  keys of the replayed requests;
- reading is lazy and single-pass each time; nothing of the file is kept between the two reads.

A live source (``replay shadow``, a stream) has no second read: it writes the production
exchanges as they are captured, and offers no ``recorded``.
"""

from __future__ import annotations

from replay.play.plan import build_plan


class RecordedSource:
    """The requests of ``path`` (a .rlog log or a pcap/pcapng capture), planned."""

    def __init__(self, path: str, *, ports=(), rules=None, stream: bool = True):
        self.path = path
        self.ports = ports
        self.rules = rules
        self.stream = stream
        self.streaming = False
        self._read = None

    @property
    def warnings(self) -> tuple:
        """What the reader of the planning pass found worth a warning (after ``plan``)."""
        return tuple(getattr(self._read, "warnings", ()))

    def _open(self):
        from replay.pipeline import open_input

        return open_input(self.path, ports=self.ports)

    def plan(self, host: str | None, keep_host: bool = False):
        """The plan, with ``host`` as the Host value sent (None: the recorded one): for a
        ``.rlog`` log a ``stream.StreamingPlan`` (read as the replay goes), for a capture (or
        with ``stream=False``) a whole ``Plan``."""
        from replay.log import LogReader, is_rlog
        from replay.spool import seekable

        rules = self.rules
        if self.stream:
            path = seekable(self.path)
            if is_rlog(path):
                from replay.play.stream import StreamingPlan, index_header

                self.streaming = True
                self._read = LogReader(path)
                header = index_header(self._read)

                def open_messages(shard=None):
                    src = self._read = plan.reading = LogReader(path)
                    if rules is not None:
                        return rules.apply(src, shard=shard)
                    return src if shard is None else shard.keep(src)

                plan = StreamingPlan(path, header, open_messages, host,
                                     keep_host or (rules is not None and rules.sets_host), rules)
                return plan
        src = self._read = self._open()
        if rules is not None:
            return build_plan(rules.apply(src), host, keep_host or rules.sets_host)
        return build_plan(src, host, keep_host)

    def recorded(self, keys: set):
        """The recorded messages whose ``(conn, index)`` is in ``keys``, rewritten as planned."""
        rules = self.rules
        for m in self._open():
            if (m.conn, m.index) in keys:
                yield rules.rewrite(m) if rules is not None else m
