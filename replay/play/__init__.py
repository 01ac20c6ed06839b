"""``replay play``: recorded requests sent to a target on their recorded schedule.

Data flows one way: ``plan`` (messages -> requests grouped by recorded connection, sans-IO) ->
``scheduler`` (absolute deadlines and the wait for them, clock injected, sans-IO) -> ``sender``
(asyncio connections to the target; responses framed by ``core.ResponseFramer``) -> ``report``
(counts, statuses against the recorded ones, latency, lateness). ``clock`` holds the real clock
and the event loop with microsecond timers. ``source`` reads a log or capture into a plan (and
the recorded exchanges back after the run); ``session`` wires one run (``PlaySession``: sender,
report, output log, status line, signals, event loop), so that ``replay.cli.play`` only parses
flags, opens the output files and hands over, and other commands can run the same path.

The layout splits the suggested ``scheduler.py`` in two: ``plan.py`` decides *what* is sent
(grouping, pipelining, Host and Content-Length), ``scheduler.py`` only *when*, so each is tested
on its own without sockets or clocks.
"""
