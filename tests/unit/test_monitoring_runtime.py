"""service/monitoring_runtime.py: objectives per model, the drift reference, the drift tap, and
no drift process unless a drift run needs one."""

from __future__ import annotations

import base64
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdgate.monitoring.card_figures import CardFigures
from kdgate.monitoring.drift import InputBuffer, Reference
from kdgate.monitoring.drift_features import DriftFeatures, InputSpec
from kdgate.monitoring.slo import SloConfig, objectives_for
from kdgate.service.monitoring_runtime import (
    LazyProcessPool,
    input_tap,
    loosest,
    model_objectives,
    reference_path,
)
from kdgate.service.request_log import Served
from kdgate.service.settings import Settings, default_models_dir, load_settings


def test_default_pair_keeps_every_default_objective() -> None:
    ((name, objectives),) = model_objectives(Settings()).items()
    assert name == "digits"
    assert [(o.slo, o.objective, o.source) for o in objectives] == [
        (o.slo, o.objective, "default") for o in objectives_for(None, SloConfig())
    ]


def test_loosest_objective_across_student_cards() -> None:
    strict = objectives_for(None, SloConfig())
    lax = objectives_for(CardFigures(kl_mean_nats=0.2, agreement=0.9), SloConfig())
    chosen = {o.slo: o for o in loosest([strict, lax])}
    assert chosen["kl_mean"].objective == pytest.approx(0.4)
    assert chosen["agreement"].objective == pytest.approx(0.88)
    assert chosen["p95_latency"].objective == 0.1


def test_reference_is_beside_the_first_students_card() -> None:
    (model,) = Settings().models
    assert reference_path(model, "reference.npz") == default_models_dir() / "digits/reference.npz"
    assert reference_path(model, "/abs/ref.npz") == Path("/abs/ref.npz")


def served(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None) -> Served:
    return Served("v2", "m", None, 200, 0.0, "id", inputs, outputs or {}, None, 0.0)


def test_tap_buffers_matching_matrices_only() -> None:
    buffer = InputBuffer(8, 4)
    features = DriftFeatures.for_signature([InputSpec("input", "FP32", [-1, 4])], scores=None)
    tap = input_tap("m", features, Reference(np.zeros((5, 4)), source="given"), buffer)
    tap(
        [
            served({"input": np.ones((3, 4), np.float32)}),
            served({"input": np.ones((3, 5), np.float32)}),  # another width: not this model's
            served({"input": np.ones(4, np.float32)}),  # not a matrix
            served({"input": np.full((2, 4), 2, np.float64)}),  # any numeric dtype: cast
        ]
    )
    assert len(buffer) == 5
    np.testing.assert_array_equal(buffer.snapshot()[-2:], np.full((2, 4), 2, np.float32))


def test_tap_fills_a_served_reference_first_then_the_buffer() -> None:
    """The first N rows are the reference and never also the compared window."""
    buffer = InputBuffer(100, 2)
    features = DriftFeatures.for_signature([InputSpec("x", "INT32", [-1, 2])], scores=None)
    reference = Reference.served(5)
    tap = input_tap("m", features, reference, buffer)
    tap([served({"x": np.array([[0, 0], [1, 1], [2, 2]], np.int32)})])
    assert not reference.ready and reference.describe() == "first 5 served rows, collecting 3/5"
    assert len(buffer) == 0
    tap([served({"x": np.array([[3, 3], [4, 4], [5, 5]], np.int32)})])
    assert reference.ready and reference.describe() == "first 5 served rows"
    assert reference.rows is not None and reference.rows[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert buffer.snapshot()[:, 0].tolist() == [5]


def test_webhook_secret_from_the_environment_is_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "whsec_" + base64.b64encode(b"s3cr3t from the environment, 32").decode()
    monkeypatch.setenv("KDGATE_WEBHOOK__URL", "http://127.0.0.1:9/hook")
    monkeypatch.setenv("KDGATE_WEBHOOK__SECRET", secret)
    settings = load_settings(environ={})
    assert settings.webhook.secret is not None
    assert settings.webhook.secret.get_secret_value() == secret
    assert secret not in repr(settings) and secret not in str(settings)
    assert secret not in settings.model_dump_json()


def test_webhook_url_without_a_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDGATE_WEBHOOK__URL", "http://127.0.0.1:9/hook")
    with pytest.raises(ValueError, match=r"webhook\.secret"):
        load_settings(environ={})


CHILDREN_AFTER_START = """
import asyncio, os, sys
from prometheus_client import CollectorRegistry
from kdgate.service.app import create_app
from kdgate.service.request_log import Served
from kdgate.service.settings import Settings
from tests.support.asgi import running


def children() -> int:
    mine = str(os.getpid())
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            count += fields[1] == mine  # field 4 of stat: the parent's pid
    return count


async def main() -> None:
    settings = Settings.model_validate({"drift": {"enabled": sys.argv[1] == "on"}})
    async with running(create_app(settings, registry=CollectorRegistry())) as client:
        assert (await client.get("/v2/health/ready")).status_code == 200
        await asyncio.sleep(0.2)  # the drift job's first (too small) run has happened
        print(children())


asyncio.run(main())
"""


@pytest.mark.parametrize("drift", ["on", "off"])
def test_no_child_process_until_a_drift_run_needs_one(drift: str, tmp_path: Path) -> None:
    """Drift off, or on with too few inputs to run yet: the gateway has no child process (not
    even multiprocessing's resource tracker, which a pool's queues would start)."""
    environ = {**os.environ, "KDGATE_ADMIN__STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", CHILDREN_AFTER_START, drift],
        capture_output=True,
        text=True,
        env=environ,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "0"


def test_the_drift_pool_starts_its_process_at_the_first_run() -> None:
    pool = LazyProcessPool()
    assert multiprocessing.active_children() == []
    try:
        assert pool.submit(abs, -3).result(timeout=60) == 3
        assert len(multiprocessing.active_children()) == 1
    finally:
        pool.shutdown()
    assert multiprocessing.active_children() == []


def test_the_drift_child_is_replaced_after_its_runs() -> None:
    """A long-lived pandas/Evidently process grows run after run: a fresh one bounds it."""
    pool = LazyProcessPool(runs_per_child=2)
    try:
        pids = [pool.submit(os.getpid).result(timeout=60) for _ in range(5)]
    finally:
        pool.shutdown()
    assert os.getpid() not in pids
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_the_local_teacher_runs_on_its_configured_providers_and_options(tmp_path: Path) -> None:
    from kdgate.service.cards import load_card
    from kdgate.service.monitoring_runtime import _local_teacher
    from kdgate.service.runtime import ProviderUnavailable
    from kdgate.service.settings import TeacherSettings
    from tests.support.tiny_model import write_tiny_student

    card = write_tiny_student(tmp_path)
    settings = TeacherSettings(
        card=card,
        providers=["CPUExecutionProvider"],
        session_options={"intra_op_threads": 2, "graph_optimization_level": "enable_basic"},
    )
    teacher = _local_teacher(settings, load_card(card), "logits", {})
    options = teacher._session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    assert teacher._session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ProviderUnavailable, match=r"\['CUDAExecutionProvider'\] not available"):
        _local_teacher(
            settings.model_copy(update={"providers": ["CUDAExecutionProvider"]}),
            load_card(card),
            "logits",
            {},
        )
