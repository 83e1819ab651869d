"""Fixtures for the bench tests: the live tiny tokenstep server and the
embedding server (all-MiniLM-L6-v2) from tests/e2e."""

from tests.e2e.conftest import embedding_server, tiny_server  # noqa: F401
