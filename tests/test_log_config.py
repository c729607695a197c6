"""The log lines: a request's fields on each of its lines, the canonical request line, levels."""

import contextvars
import io
from typing import Any

import orjson
import pytest
import structlog

from identity_service import log_config
from identity_service.log_config import (
    bind_request,
    configure_logging,
    log_request_line,
    start_request_fields,
)


@pytest.fixture
def output(log_buffer: io.BytesIO) -> io.BytesIO:
    return log_buffer


def lines(buffer: io.BytesIO) -> list[dict[str, Any]]:
    log_config.flush()
    return [orjson.loads(line) for line in buffer.getvalue().splitlines()]


def in_new_context(function: Any) -> None:
    contextvars.Context().run(function)


def test_the_request_line_and_other_lines_carry_the_request_fields(output: io.BytesIO) -> None:
    configure_logging("info", output)

    def request() -> None:
        start_request_fields("req-1")
        bind_request(source="shop", token_id="0123456789ab")
        structlog.get_logger("test").warning("something", detail=3)
        log_request_line({"method": "POST", "path": "/v1/handoffs", "status": 201})

    in_new_context(request)
    in_new_context(lambda: structlog.get_logger("test").info("outside"))
    warning, request_line, outside = lines(output)
    expected = {"request_id": "req-1", "source": "shop", "token_id": "0123456789ab"}
    assert warning.items() >= {**expected, "event": "something", "detail": 3}.items()
    assert warning["level"] == "warning"
    assert request_line.items() >= {**expected, "event": "request", "status": 201}.items()
    assert (request_line["level"], request_line["method"]) == ("info", "POST")
    assert request_line["timestamp"].endswith("Z") and len(request_line["timestamp"]) == 24
    assert "request_id" not in outside and outside["event"] == "outside"


def test_each_request_starts_with_only_its_own_fields(output: io.BytesIO) -> None:
    configure_logging("info", output)

    def request(number: int, source: str | None) -> None:
        start_request_fields(f"req-{number}")
        if source is not None:
            bind_request(source=source)
        log_request_line({"status": 200})

    context = contextvars.Context()  # one connection's context, reused as aiohttp does
    context.run(request, 1, "shop")
    context.run(request, 2, None)
    first, second = lines(output)
    assert (first["request_id"], first["source"]) == ("req-1", "shop")
    assert second["request_id"] == "req-2" and "source" not in second


def test_above_info_the_request_line_is_not_written(output: io.BytesIO) -> None:
    configure_logging("warning", output)

    def request() -> None:
        start_request_fields("req-1")
        log_request_line({"status": 201})
        structlog.get_logger("test").info("quiet")
        structlog.get_logger("test").warning("loud")

    in_new_context(request)
    assert [line["event"] for line in lines(output)] == ["loud"]
