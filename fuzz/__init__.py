"""Coverage-guided fuzz harnesses (atheris/libFuzzer) for every parser of outside bytes; see fuzz/run.py."""
