"""Fixtures for the bench tests: the live tiny tokenstep server from tests/e2e."""

from tests.e2e.conftest import tiny_server  # noqa: F401
