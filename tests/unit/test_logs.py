"""Log formatters: RFC 3339 UTC time, level, logger, message, and the current request/trace id."""

from __future__ import annotations

import io
import json
import logging
import pydoc
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from opentelemetry.sdk.trace import TracerProvider

from kdgate.service.logs import (
    FORMATTERS,
    SCOPE_REQUEST_ID,
    JsonFormatter,
    TextFormatter,
    bind_request,
    log_config,
    unbind_request,
)

Captured = tuple[logging.Logger, io.StringIO, logging.Handler]
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def captured() -> Iterator[Captured]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("kdgate.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)


def scope(*headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"type": "http", "headers": list(headers)}


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_time_level_logger_and_message(captured: Captured) -> None:
    logger, stream, handler = captured
    handler.setFormatter(JsonFormatter())
    before = datetime.now(UTC)
    logger.warning("queue %s is %d%% full", "shadow", 90)
    (line,) = json_lines(stream)
    assert set(line) == {"time", "level", "logger", "message"}  # no request: no ids
    assert RFC3339_UTC.match(str(line["time"]))
    logged = datetime.fromisoformat(str(line["time"]))
    assert logged.utcoffset() == timedelta(0)
    assert abs(logged - before) < timedelta(seconds=5)
    assert (line["level"], line["logger"]) == ("WARNING", "kdgate.test_logs")
    assert line["message"] == "queue shadow is 90% full"


def test_json_line_names_the_bound_request(captured: Captured) -> None:
    logger, stream, handler = captured
    handler.setFormatter(JsonFormatter())
    token = bind_request(scope((b"x-request-id", b"req-42")))
    try:
        logger.info("inside")
    finally:
        unbind_request(token)
    logger.info("outside")
    inside, outside = json_lines(stream)
    assert inside["request_id"] == "req-42"
    assert "request_id" not in outside


def test_a_made_up_id_wins_and_an_invalid_header_is_not_logged(captured: Captured) -> None:
    logger, stream, handler = captured
    handler.setFormatter(JsonFormatter())
    made_up = scope((b"x-request-id", b"\x00bad"))
    token = bind_request(made_up)
    logger.info("before the app made one up")
    made_up[SCOPE_REQUEST_ID] = "0123abcd"
    logger.info("after")
    logger.info("given", extra={"request_id": "explicit"})
    unbind_request(token)
    first, second, third = json_lines(stream)
    assert "request_id" not in first
    assert second["request_id"] == "0123abcd"
    assert third["request_id"] == "explicit"


def test_trace_id_is_the_current_span_s(captured: Captured) -> None:
    logger, stream, handler = captured
    handler.setFormatter(JsonFormatter())
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        logger.info("in a span")
    logger.info("no span")
    inside, outside = json_lines(stream)
    assert inside["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert "trace_id" not in outside


def test_exception_stays_inside_its_json_line(captured: Captured) -> None:
    logger, stream, handler = captured
    handler.setFormatter(JsonFormatter())
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed")
    (line,) = json_lines(stream)
    assert line["message"] == "failed"
    assert "RuntimeError: boom" in str(line["exception"])


def test_text_line_starts_with_time_and_level(captured: Captured) -> None:
    logger, stream, handler = captured
    handler.setFormatter(TextFormatter())
    token = bind_request(scope((b"x-request-id", b"r-1")))
    logger.info("hello")
    unbind_request(token)
    time_text, level, rest = stream.getvalue().strip().split(" ", 2)
    assert RFC3339_UTC.match(time_text)
    assert level == "INFO"
    assert rest == "kdgate.test_logs: hello [request_id=r-1]"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_log_config_puts_uvicorn_and_kdgate_on_one_formatter(log_format: str) -> None:
    config = log_config("warning", log_format)
    formatter = {"()": f"kdgate.service.logs.{log_format.title()}Formatter"}
    assert config["formatters"]["default"] == formatter
    assert config["loggers"]["kdgate"]["level"] == "WARNING"
    assert config["loggers"]["kdgate.audit"]["level"] == "INFO"
    assert config["loggers"]["kdgate.access"]["level"] == "INFO"
    assert pydoc.locate(formatter["()"]) is FORMATTERS[log_format]
