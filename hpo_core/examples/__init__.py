"""Example objectives that ship with the worker image."""
