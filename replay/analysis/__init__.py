"""Analysis of replays: which endpoints got slower, fail or answer differently (``replay report``)."""
