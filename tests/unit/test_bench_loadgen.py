"""bench/wrk.py and bench/k6.py: the load generators' output parsed into LoadResult.

The sample outputs are what wrk 4.1 (with bench's Lua hook) and k6 1.1 printed against a server
answering 404, so failures are counted from the tools' real fields.
"""

from __future__ import annotations

import json

import pytest

from bench import k6, wrk

WRK_STDOUT = """\
Running 1s test @ http://127.0.0.1:58047/v2/models/nope/infer
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   222.64us   75.04us   1.65ms   80.37%
    Req/Sec     9.05k   115.13     9.20k    72.73%
  9888 requests in 1.10s, 1.62MB read
  Non-2xx or 3xx responses: 9888
Requests/sec:   8993.61
Transfer/sec:      1.48MB
BENCH_RESULT {"requests":9888,"duration_us":1099447,"connect":1,"read":2,"write":3,"status":9888,\
"timeout":4,"p50_us":214.0,"p95_us":335.0,"p99_us":371.0,"max_us":1652.0}
"""


def test_wrk_result_line_parsed_in_milliseconds_with_all_errors_summed() -> None:
    result = wrk.parse_output(WRK_STDOUT)
    assert result.requests == 9888
    assert result.duration_s == pytest.approx(1.099447)
    assert result.rps == pytest.approx(9888 / 1.099447)
    assert result.failed == 9888 + 1 + 2 + 3 + 4
    assert (result.p50_ms, result.p95_ms, result.p99_ms, result.max_ms) == pytest.approx(
        (0.214, 0.335, 0.371, 1.652)
    )


def test_wrk_output_without_the_hook_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="BENCH_RESULT"):
        wrk.parse_output("Running 1s test @ http://127.0.0.1:1/\nunable to connect\n")


def test_lua_script_posts_the_body_verbatim() -> None:
    body = b'{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","data":[0.0,"]]"]}]}'
    script = wrk.lua_script(body)
    start = script.index("[==[") + len("[==[")
    assert script[start : script.index("]==]")] == body.decode()
    assert 'wrk.method = "POST"' in script
    assert "latency:percentile(95)" in script


def test_lua_script_refuses_a_body_that_would_end_the_long_string() -> None:
    with pytest.raises(ValueError, match="]==]"):
        wrk.lua_script(b'{"x": "]==]"}')


def _k6_summary(*, failed: int, count: int, dropped: int | None) -> dict[str, object]:
    metrics: dict[str, object] = {
        "http_req_duration": {
            "type": "trend",
            "contains": "time",
            "values": {"med": 0.713879, "p(95)": 0.984316, "p(99)": 1.0079288, "max": 1.013832},
        },
        "http_reqs": {"type": "counter", "values": {"count": count, "rate": count / 10}},
        "http_req_failed": {
            "type": "rate",
            "values": {"rate": failed / count, "passes": failed, "fails": count - failed},
        },
    }
    if dropped is not None:
        metrics["dropped_iterations"] = {"type": "counter", "values": {"count": dropped}}
    return {"metrics": metrics, "state": {"testRunDurationMs": 10002.1}}


def test_k6_failed_requests_are_the_rate_metric_passes() -> None:
    summary = json.loads(json.dumps(_k6_summary(failed=21, count=10000, dropped=7)))
    result = k6.parse_summary(summary, duration_s=10)
    assert (result.requests, result.failed, result.dropped) == (10000, 21, 7)
    assert result.rps == pytest.approx(1000)
    assert (result.p50_ms, result.p95_ms, result.p99_ms, result.max_ms) == pytest.approx(
        (0.713879, 0.984316, 1.0079288, 1.013832)
    )


def test_k6_summary_without_dropped_iterations_means_none_dropped() -> None:
    result = k6.parse_summary(_k6_summary(failed=0, count=500, dropped=None), duration_s=5)
    assert (result.failed, result.dropped) == (0, 0)


def test_k6_script_uses_a_constant_arrival_rate() -> None:
    assert "executor: 'constant-arrival-rate'" in k6.SCRIPT
    assert "'p(95)'" in k6.SCRIPT
