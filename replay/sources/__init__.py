"""Thin shells that read packets (capture files, live interfaces) and hand them to the core in batches."""
