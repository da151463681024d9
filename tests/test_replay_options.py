"""--replay-dlq's --codes and --since, refused in one line when they cannot work."""

import pytest

from contract.cli import UserError
from producer.replay import RETRYABLE, parse_codes, parse_since


def test_codes_are_checked_and_too_large_is_refused():
    assert parse_codes("model_error, invalid_json,model_error") == ("model_error", "invalid_json")
    assert set(RETRYABLE) == {"model_error", "output_rejected", "internal_error"}
    with pytest.raises(UserError, match="first 64 KiB"):
        parse_codes("model_error,too_large")
    with pytest.raises(UserError, match="unknown dead-letter code 'model_eror'"):
        parse_codes("model_eror")


def test_since_takes_durations_epochs_and_iso_times():
    now = 1_800_000_000.0
    assert parse_since("90s", now) == now - 90 and parse_since("2h", now) == now - 7200
    assert parse_since("1d", now) == now - 86400 and parse_since("1700000000.5", now) == 1_700_000_000.5
    assert parse_since("2024-06-10T08:00:00Z", now) == parse_since("2024-06-10T08:00:00", now) == 1718006400.0
    assert parse_since("2024-06-10T10:00:00+02:00", now) == 1718006400.0
    with pytest.raises(UserError, match="--since 'yesterday'"):
        parse_since("yesterday", now)
