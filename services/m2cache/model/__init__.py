"""Reference model: pure torch, no I/O (loader.py is the one bridge to a store)."""
