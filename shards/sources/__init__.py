"""Readers of the real datasets' on-disk layouts and label files (reference §4)."""
