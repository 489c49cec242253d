"""The fault sweep (sweep.py): broken inputs against the real commands."""
