"""The reliability flags parse from the command line and the environment,
and their defaults are the documented ones."""

import os

import pytest

from server.cli import parse_settings
from server.settings import Settings


def test_reliability_flags_parse(monkeypatch: pytest.MonkeyPatch):
    for name in [name for name in os.environ if name.upper().startswith("TOKENSTEP_")]:
        monkeypatch.delenv(name)
    settings = parse_settings(
        [
            "--max-queue-len",
            "5",
            "--request-timeout",
            "2.5",
            "--shutdown-timeout",
            "3",
            "--allowed-origins",
            "https://a.example,https://b.example",
        ]
    )
    assert (settings.max_queue_len, settings.request_timeout, settings.shutdown_timeout) == (5, 2.5, 3.0)
    assert settings.allowed_origin_list == ["https://a.example", "https://b.example"]
    monkeypatch.setenv("TOKENSTEP_MAX_QUEUE_LEN", "7")
    monkeypatch.setenv("TOKENSTEP_SHUTDOWN_TIMEOUT", "4")
    assert (parse_settings([]).max_queue_len, parse_settings([]).shutdown_timeout) == (7, 4.0)
    monkeypatch.delenv("TOKENSTEP_MAX_QUEUE_LEN")
    monkeypatch.delenv("TOKENSTEP_SHUTDOWN_TIMEOUT")
    defaults = Settings()
    assert (defaults.max_queue_len, defaults.request_timeout, defaults.shutdown_timeout, defaults.allowed_origin_list) == (
        256,
        None,
        30.0,
        [],
    )
