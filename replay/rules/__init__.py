"""Filters, rewrites, middleware and plugins applied to messages."""
