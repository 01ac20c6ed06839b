"""The command line: one click group (main.py), one module per command."""
