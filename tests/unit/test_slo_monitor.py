"""The in-process SLO monitor (monitoring/slo_monitor.py) over a recent window, driven by a fake
clock."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook

from kdgate.monitoring.fidelity import Calibration, Comparison
from kdgate.monitoring.metrics import LATENCY_BUCKETS_SECONDS, Metrics, bucket_counts
from kdgate.monitoring.outbox import Outbox
from kdgate.monitoring.recent import RecentWindow
from kdgate.monitoring.recorder import TEACHER_VERSION, FidelityRecorder
from kdgate.monitoring.slo import Breach, SloConfig, objectives_for
from kdgate.monitoring.slo_monitor import Monitor, histogram_quantile
from kdgate.monitoring.webhook import Notifier, WebhookConfig, retrain_payload

SECRET = "whsec_" + base64.b64encode(b"monitor test signing key 32 bytes").decode()
INVERTED_DIGITS = ["agreement", "kl_mean", "ece_teacher", "drift_share"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


CONFIG = SloConfig(
    window_seconds=60,
    window_buckets=6,
    min_samples=100,
    consecutive_breaches=3,
    evaluate_every_seconds=10,
)


@pytest.fixture
def setup() -> tuple[Monitor, Metrics, FakeClock, list[tuple[str, Breach]]]:
    metrics = Metrics(CollectorRegistry())
    clock = FakeClock()
    calls: list[tuple[str, Breach]] = []
    window = RecentWindow(window_seconds=60, bucket_seconds=10, clock=clock)
    monitor = Monitor(
        {"digits": objectives_for(None, CONFIG, "digits")},
        CONFIG,
        metrics,
        window,
        on_breach=lambda model, breach: calls.append((model, breach)),
    )
    return monitor, metrics, clock, calls


def observe_fidelity(monitor: Monitor, n: int, agreements: float, kl_sum: float) -> None:
    """`n` compared pairs, `agreements` of them agreeing, with KL summing to `kl_sum`."""
    agree = np.arange(n) < round(agreements)
    none = np.zeros(15)
    calibration = Calibration(none.astype(np.int64), none, none.astype(np.int64))
    monitor.window.add_comparison(
        "digits", "1", Comparison(agree, np.full(n, kl_sum / n), calibration)
    )


def step(monitor: Monitor, clock: FakeClock, agreement: float, n: int = 100) -> None:
    """Ten seconds of traffic at the given agreement, then one evaluation."""
    clock.now += 10
    observe_fidelity(monitor, n, agreement * n, 0.01 * n)
    monitor.evaluate()


def breached(metrics: Metrics, slo: str) -> float | None:
    return metrics.registry.get_sample_value("kdgate_slo_breached", {"model": "digits", "slo": slo})


def test_breach_needs_k_consecutive_failures_and_calls_back_once(setup) -> None:
    monitor, metrics, clock, calls = setup
    for _ in range(8):
        step(monitor, clock, 0.99)
    assert calls == [] and breached(metrics, "agreement") == 0
    # The window is 60 s: after the switch it takes a while for the window to fall below 0.95,
    # then k = 3 failing evaluations.
    failing, observed_at_breach = 0, None
    for _ in range(12):
        step(monitor, clock, 0.5)
        row = next(r for r in monitor.status() if r["slo"] == "agreement")
        failing = failing + 1 if row["observed"] < 0.95 else 0
        assert len(calls) == (1 if failing >= 3 else 0), failing
        if failing == 3:
            observed_at_breach = row["observed"]
    assert breached(metrics, "agreement") == 1
    assert len(calls) == 1
    model, breach = calls[0]
    assert model == "digits"
    assert breach["slo"] == "agreement"
    assert breach["objective"] == 0.95
    assert breach["window_seconds"] == 60
    assert breach["samples"] >= 100
    assert breach["observed"] == observed_at_breach


def test_lasting_breach_does_not_call_again_and_clears_after_k_passes(setup) -> None:
    monitor, metrics, clock, calls = setup
    for _ in range(20):
        step(monitor, clock, 0.5)
    assert len(calls) == 1
    # Recovery: window must first exceed 0.95, then 3 passing evaluations.
    for _ in range(6):
        step(monitor, clock, 1.0)
    assert breached(metrics, "agreement") == 1  # window still holds bad samples
    for _ in range(3):
        step(monitor, clock, 1.0)
    assert breached(metrics, "agreement") == 0
    # A new episode is a new breach.
    for _ in range(12):
        step(monitor, clock, 0.5)
    assert len(calls) == 2


def test_flapping_below_k_never_breaches(setup) -> None:
    monitor, metrics, clock, calls = setup
    # One bad 10 s bucket among good ones keeps the 60 s window above 0.95 only sometimes;
    # use direct control: alternate failing and passing evaluations.
    for i in range(20):
        clock.now += 60  # a whole new window each time
        observe_fidelity(monitor, 200, (0.5 if i % 2 else 1.0) * 200, 1)
        monitor.evaluate()
    assert calls == []
    assert breached(metrics, "agreement") == 0


def test_every_slo_is_exported_as_not_breached_before_any_data(setup) -> None:
    monitor, metrics, _, _ = setup
    slos = [row["slo"] for row in monitor.status()]
    assert "agreement" in slos
    assert [breached(metrics, slo) for slo in slos] == [0.0] * len(slos)


def test_thin_window_is_ignored(setup) -> None:
    monitor, _, clock, calls = setup
    for _ in range(20):
        step(monitor, clock, 0.0, n=5)  # 30 samples per window < min_samples 100
    assert calls == []
    row = next(r for r in monitor.status() if r["slo"] == "agreement")
    assert row["status"] == "insufficient_data"
    assert row["samples"] == 30
    assert row["observed"] == 0.0


def test_status_reports_every_slo_with_source(setup) -> None:
    monitor, _, clock, _ = setup
    step(monitor, clock, 0.99)
    rows = {r["slo"]: r for r in monitor.status()}
    assert set(rows) == {
        "agreement",
        "kl_mean",
        "ece_teacher",
        "ece_label",
        "p95_latency",
        "drift_share",
    }
    assert rows["agreement"]["observed"] == pytest.approx(0.99)
    assert rows["kl_mean"]["observed"] == pytest.approx(0.01)
    assert rows["ece_label"]["observed"] is None  # no labels yet: JSON null, not NaN
    assert rows["agreement"]["source"] == "default"
    assert rows["agreement"]["samples"] == 100


def test_window_forgets_old_traffic(setup) -> None:
    monitor, _, clock, _ = setup
    step(monitor, clock, 0.5)
    clock.now += 120
    monitor.evaluate()
    row = next(r for r in monitor.status() if r["slo"] == "agreement")
    assert row["samples"] == 0 and row["observed"] is None


def test_drift_breach(setup) -> None:
    monitor, metrics, clock, calls = setup
    for _ in range(3):
        clock.now += 10
        monitor.window.set_drift("digits", 0.9, rows=500)
        monitor.evaluate()
    assert [b["slo"] for _, b in calls] == ["drift_share"]
    assert calls[0][1]["samples"] == 500
    assert breached(metrics, "drift_share") == 1


def test_reads_the_window_its_producers_feed(setup) -> None:
    """Recorder and request latency -> the window -> the same figures an independent
    computation gives."""
    monitor, metrics, clock, _ = setup
    rng = np.random.default_rng(0)
    recorder = FidelityRecorder(metrics, "digits", window=monitor.window)
    student = rng.normal(0, 2, (300, 10))
    teacher = student + rng.normal(0, 0.5, (300, 10))
    recorder.record_comparison("1", student[:150], teacher[:150])
    recorder.record_comparison("2", student[150:], teacher[150:])
    latencies = rng.exponential(0.01, 400)
    upper = np.array([*LATENCY_BUCKETS_SECONDS, np.inf])
    monitor.window.add_latency("digits", "1", bucket_counts(upper, latencies))
    # The teacher's own label calibration must not count as the student's.
    recorder.record_labels(TEACHER_VERSION, teacher, rng.integers(0, 10, 300))
    clock.now += 10
    monitor.evaluate()
    rows = {r["slo"]: r for r in monitor.status()}
    p_t = np.exp(teacher - teacher.max(1, keepdims=True))
    p_t /= p_t.sum(1, keepdims=True)
    p_s = np.exp(student - student.max(1, keepdims=True))
    p_s /= p_s.sum(1, keepdims=True)
    assert rows["agreement"]["observed"] == pytest.approx(
        np.mean(student.argmax(1) == teacher.argmax(1))
    )
    assert rows["agreement"]["samples"] == 300
    assert rows["kl_mean"]["observed"] == pytest.approx(
        np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)), rel=1e-9
    )
    conf = p_s.max(1)
    correct = student.argmax(1) == teacher.argmax(1)
    bins = np.minimum((conf * 15).astype(int), 14)
    expected_ece = (
        sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / 300
    )
    assert rows["ece_teacher"]["observed"] == pytest.approx(expected_ece)
    assert rows["ece_label"]["samples"] == 0
    assert rows["p95_latency"]["samples"] == 400
    assert rows["p95_latency"]["observed"] == pytest.approx(
        histogram_quantile(0.95, LATENCY_BUCKETS_SECONDS, bucket_counts(upper, latencies))
    )


def prometheus_quantile(q: float, bounds: list[float], cumulative: list[float]) -> float:
    """Brute-force reference: walk the cumulative buckets as PromQL's bucketQuantile does."""
    rank = q * cumulative[-1]
    for i, count in enumerate(cumulative):
        if count >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = 0.0 if i == 0 else bounds[i - 1]
            prev = 0.0 if i == 0 else cumulative[i - 1]
            return lower + (bounds[i] - lower) * (rank - prev) / (count - prev)
    raise AssertionError


@pytest.mark.parametrize("seed", range(5))
def test_histogram_quantile_matches_promql_walk(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.exponential(0.02, 1000)
    bounds = list(LATENCY_BUCKETS_SECONDS)
    counts = np.histogram(values, [0.0, *bounds, math.inf])[0]
    ours = histogram_quantile(0.95, bounds, counts)
    assert ours == pytest.approx(prometheus_quantile(0.95, bounds, np.cumsum(counts).tolist()))
    # And close to the exact quantile (bucket resolution).
    assert abs(ours - np.quantile(values, 0.95)) < 0.02


def test_histogram_quantile_empty_is_nan() -> None:
    assert math.isnan(histogram_quantile(0.95, [0.1, 1.0], [0, 0, 0]))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_run_calls_back_in_a_thread_and_stops() -> None:
    metrics = Metrics(CollectorRegistry())
    config = SloConfig(
        window_seconds=60, min_samples=10, consecutive_breaches=1, evaluate_every_seconds=0.01
    )
    got: asyncio.Queue[tuple[str, Breach]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    monitor = Monitor(
        {"digits": objectives_for(None, config)},
        config,
        metrics,
        RecentWindow(window_seconds=60),
        on_breach=lambda m, b: loop.call_soon_threadsafe(got.put_nowait, (m, b)),
    )
    observe_fidelity(monitor, 100, 10, 1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    model, breach = await asyncio.wait_for(got.get(), 5)
    assert (model, breach["slo"]) == ("digits", "agreement")
    stop.set()
    await asyncio.wait_for(task, 5)


@pytest.mark.anyio
async def test_a_breach_the_outbox_cannot_store_stays_pending_until_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(CollectorRegistry())
    config = SloConfig(
        window_seconds=60, min_samples=10, consecutive_breaches=1, evaluate_every_seconds=0.01
    )
    outbox = Outbox(tmp_path / "state" / "outbox.sqlite3")

    def enqueue(model: str, breach: Breach) -> None:
        outbox.enqueue_breach(model, breach["slo"], dict(breach), cooldown_seconds=3600)

    window = RecentWindow(window_seconds=60, bucket_seconds=10)
    monitor = Monitor(
        {"digits": objectives_for(None, config)}, config, metrics, window, on_breach=enqueue
    )
    observe_fidelity(monitor, 100, agreements=10, kl_sum=1.0)
    # The outbox's directory is gone and a file sits where it was: nothing can be written.
    shutil.rmtree(outbox.path.parent)
    outbox.path.parent.write_text("not a directory")
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    try:
        deadline = time.monotonic() + 10
        while caplog.text.count("stays pending") < 3:  # logged, retried at each evaluation
            assert time.monotonic() < deadline, "the failed enqueue was not logged and retried"
            assert not task.done(), "the monitor task died"
            await asyncio.sleep(0.01)
        assert {(r["slo"], r["status"]) for r in monitor.status()} >= {("agreement", "breached")}
        outbox.path.parent.unlink()  # the disk is usable again
        while not (tmp_path / "state" / "outbox.sqlite3").exists() or not outbox.entries():
            assert time.monotonic() < deadline, "the pending breach was never stored"
            assert not task.done(), "the monitor task died"
            await asyncio.sleep(0.01)
        (entry,) = outbox.entries()
        assert (entry.model, entry.slo) == ("digits", "agreement")
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert len(outbox.entries()) == 1  # stored once, not once per evaluation


@pytest.mark.anyio
async def test_inverted_digits_breach_four_slos_and_send_one_signed_request(
    tmp_path: Path,
) -> None:
    """Monitor -> outbox -> notifier on one fake clock: agreement, KL and ECE breach together,
    drift share 40 s later (the drift job's cadence), all within `group_wait_seconds`: one
    request lists the four, and the official Standard Webhooks library verifies it."""
    clock = FakeClock()
    clock.now = time.time()  # the signature's timestamp must be near the verifier's clock
    metrics = Metrics(CollectorRegistry())
    config = SloConfig(window_seconds=60, min_samples=100, consecutive_breaches=2)
    window = RecentWindow(window_seconds=60, bucket_seconds=10, clock=clock)
    outbox = Outbox(tmp_path / "outbox.sqlite3", clock=clock)
    webhook = WebhookConfig(url="http://receiver.test/retrain", secret=SECRET)

    def on_breach(model: str, breach: Breach) -> None:
        payload = retrain_payload(model, [breach], student_version="1", teacher_version="1")
        outbox.enqueue_breach(
            model,
            breach["slo"],
            payload,
            cooldown_seconds=webhook.cooldown_seconds,
            group_wait_seconds=webhook.group_wait_seconds,
        )

    monitor = Monitor(
        {"digits": objectives_for(None, config, "digits")}, config, metrics, window, on_breach
    )
    received: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(204)

    async with httpx.AsyncClient(transport=httpx.MockTransport(receiver)) as client:
        notifier = Notifier(outbox, client, webhook, metrics, clock=clock)
        recorder = FidelityRecorder(metrics, "digits", window=window)
        rng = np.random.default_rng(0)
        for second in range(0, 130, 10):
            clock.now += 10
            teacher = rng.normal(0, 3, (60, 10))
            recorder.record_comparison("1", -teacher, teacher)  # inverted: the opposite class
            if second >= 40:
                window.set_drift("digits", 0.9, rows=500)
            monitor.evaluate()
            await notifier.deliver_due()
            if second < 60:
                assert received == [], "sent before the group wait ended"

    (request,) = received
    assert Webhook(SECRET).verify(request.content, dict(request.headers))
    data = json.loads(request.content)["data"]
    assert sorted(b["slo"] for b in data["breaches"]) == sorted(INVERTED_DIGITS)
    assert "follows" not in data
    delivered = outbox.get(request.headers["webhook-id"])
    assert delivered is not None and delivered.status == "delivered"
