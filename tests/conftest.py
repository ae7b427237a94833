"""Fixtures shared by several test modules."""

from test_recorder import backend  # noqa: F401  (the fixture: every recorder test runs once per backend)
