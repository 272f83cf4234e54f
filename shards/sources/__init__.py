"""Readers of the real datasets' on-disk layouts and label files (docs/method.md §4)."""
