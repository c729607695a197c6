"""The cached ISO timestamps against datetime's own formatting."""

from datetime import UTC, datetime

from identity_service.clock import iso_time


def test_iso_time_matches_datetime() -> None:
    for epoch in (0.0, 1_790_000_000.0, 1_795_000_000.123, 1_795_000_000.9995, 1_795_000_001.5):
        moment = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
        assert iso_time(epoch) == moment.replace("+00:00", "Z")


def test_iso_time_keeps_few_formatted_seconds() -> None:
    stamps = {iso_time(1_795_000_000 + n + 0.25) for n in range(100)}
    assert len(stamps) == 100
    assert iso_time(1_795_000_050.25) == "2026-11-18T11:07:30.250Z"
