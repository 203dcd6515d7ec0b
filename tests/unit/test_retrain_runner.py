"""The job runner's stages against a recording admin API (httpx.MockTransport): the version
number, register -> rollout, removal when the rollout cannot start, removal of a version a
dead process left registered."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from kdgate.service.cards import load_card
from kdgate.service.importer import ImportRequest, import_pair
from kdgate.service.retrain_config import RetrainWorkerSettings, load_worker_settings
from kdgate.service.retrain_gateway import Gateway
from kdgate.service.retrain_metrics import WorkerMetrics
from kdgate.service.retrain_queue import JobQueue
from kdgate.service.retrain_runner import JobRunner, capture_rows
from tests.support.pairs import PairCache
from tests.support.retrain_worker import retrain_body, write_worker_config

Calls = list[tuple[str, str, Any]]


class Admin:
    """A recording admin API holding versions 1, canary (not loaded) and 3. `race`: another
    student takes version 4 right after the first listing."""

    def __init__(
        self,
        rollout_status: int = 201,
        *,
        race: bool = False,
        rollout: dict[str, Any] | None = None,
        weights: dict[str, int] | None = None,
    ) -> None:
        self.calls: Calls = []
        self.rollout_status = rollout_status
        self.race = race
        self.loaded: dict[str, str | None] = {"1": "a" * 64, "canary": None, "3": "b" * 64}
        self.rollout = rollout  # GET .../rollout: this record, else 404
        self.weights = weights or {"1": 100, "canary": 0, "3": 0}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        path = request.url.path
        self.calls.append((request.method, path, body))
        assert request.headers["authorization"] == "Bearer t0ken-for-the-runner-tests"
        if request.method == "GET" and path.endswith("/rollout"):
            if self.rollout is None:
                return httpx.Response(404, json={"error": "no rollout"})
            return httpx.Response(200, json=self.rollout)
        if request.method == "GET" and path.endswith("/traffic"):
            return httpx.Response(200, json={"weights": self.weights})
        if request.method == "GET":
            listed = [{"version": v, "sha256": sha} for v, sha in self.loaded.items()]
            if self.race:
                self.loaded["4"], self.race = "f" * 64, False
            return httpx.Response(200, json={"versions": listed})
        if path.endswith("/rollout"):
            return httpx.Response(self.rollout_status, json={"error": "no such route"})
        if request.method == "POST":
            if body["version"] in self.loaded:
                return httpx.Response(400, json={"error": "already has version"})
            self.loaded[body["version"]] = load_card(body["card"]).sha256
            return httpx.Response(201, json={})
        self.loaded.pop(path.rsplit("/", 1)[1])
        return httpx.Response(200, json={})


def settings_for(
    tmp_path: Path, pairs: PairCache, job_fields: dict[str, Any] | None = None, **more: Any
) -> RetrainWorkerSettings:
    pair = pairs.get("tabular")
    script = tmp_path / "train.py"
    script.write_text(
        "import os, shutil, sys, time\n"
        "out = os.environ['KDGATE_OUT']\n"
        "open(os.path.join(out, 'started'), 'w').write(repr(time.time()))\n"
        "shutil.copyfile(sys.argv[1], os.path.join(out, 'student.onnx'))\n"
    )
    job = {
        **(job_fields or {}),
        "kind": "command",
        "command": [sys.executable, str(script), str(pair.student)],
        "teacher": str(pair.teacher),
        "sample": str(pair.sample),
    }
    config = write_worker_config(
        tmp_path, gateway_url="http://gateway.test", models={"tabular": job}, **more
    )
    return load_worker_settings(config)


def runner_for(settings: RetrainWorkerSettings, admin: Admin) -> tuple[JobRunner, JobQueue]:
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(admin),
        base_url=settings.gateway.url,
        headers={"authorization": "Bearer t0ken-for-the-runner-tests"},
    )
    queue = JobQueue(settings.work_dir / "jobs.sqlite3")
    metrics = WorkerMetrics(CollectorRegistry())
    return JobRunner(settings, queue, Gateway(client, timeout_seconds=5), metrics), queue


@pytest.mark.parametrize("rollout_status", [201, 404, 405])
def test_register_then_rollout_and_removal_when_the_rollout_cannot_start(
    tmp_path: Path, pairs: PairCache, rollout_status: int
) -> None:
    settings = settings_for(tmp_path, pairs, rollout={"steps": ["dark", 100]})
    admin = Admin(rollout_status)
    runner, queue = runner_for(settings, admin)
    queue.add("msg_1", "tabular", retrain_body("tabular").decode())
    job = queue.claim()
    assert job is not None
    asyncio.run(runner.execute(job))

    card = settings.work_dir / "jobs" / "job-000001" / "card" / "student.card.json"
    expected: Calls = [
        ("GET", "/admin/models/tabular/rollout", None),  # none in progress
        ("GET", "/admin/models/tabular/traffic", None),  # version 1 still serves
        ("GET", "/admin/models/tabular/versions", None),
        ("POST", "/admin/models/tabular/versions", {"card": str(card.resolve()), "version": "4"}),
        ("POST", "/admin/models/tabular/rollout", {"steps": ["dark", 100], "candidate": "4"}),
    ]
    done = queue.get(job.seq)
    assert done is not None and done.version == "4" and done.registered is None
    if rollout_status == 201:
        assert admin.calls == expected
        assert done.status == "succeeded" and done.error is None
        assert admin.loaded["4"] == load_card(card).sha256
    else:
        removal = [
            ("GET", "/admin/models/tabular/versions", None),
            ("DELETE", "/admin/models/tabular/versions/4", None),
        ]
        assert admin.calls == [*expected, *removal]
        assert done.status == "failed" and done.stage == "rollout"
        assert f"HTTP {rollout_status}" in (done.error or "")
        assert "version 4 removed again" in (done.error or "")
        assert "4" not in admin.loaded


def test_a_version_another_student_took_meanwhile_is_left_alone(
    tmp_path: Path, pairs: PairCache
) -> None:
    settings = settings_for(tmp_path, pairs)
    admin = Admin(race=True)
    runner, queue = runner_for(settings, admin)
    queue.add("msg_1", "tabular", retrain_body("tabular").decode())
    job = queue.claim()
    assert job is not None
    asyncio.run(runner.execute(job))
    done = queue.get(job.seq)
    assert done is not None and done.status == "failed" and done.stage == "register"
    assert "left alone" in (done.error or "")
    assert admin.loaded["4"] == "f" * 64 and all(c[0] != "DELETE" for c in admin.calls)


def test_a_version_left_registered_by_a_dead_process_is_removed_and_the_job_rerun(
    tmp_path: Path, pairs: PairCache
) -> None:
    settings = settings_for(tmp_path, pairs)
    queue = JobQueue(settings.work_dir / "jobs.sqlite3")
    queue.add("msg_1", "tabular", retrain_body("tabular").decode())
    dead = queue.claim()
    assert dead is not None
    # The dead process had written its student and registered it as 4, not rolled out.
    pair = pairs.get("tabular")
    directory = settings.work_dir / "jobs" / dead.name
    imported = import_pair(ImportRequest(pair.teacher, pair.student, "tabular", directory / "card"))
    queue.set_registered(dead.seq, "4")
    admin = Admin()
    admin.loaded["4"] = imported.student_card.sha256
    runner, queue = runner_for(settings, admin)

    async def run_until_finished() -> None:
        task = asyncio.create_task(runner.run())
        deadline = time.monotonic() + 60
        while True:
            job = await asyncio.to_thread(queue.get, dead.seq)
            if job is not None and job.status not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run_until_finished())
    assert admin.calls[:2] == [
        ("GET", "/admin/models/tabular/versions", None),
        ("DELETE", "/admin/models/tabular/versions/4", None),
    ]
    assert [c[:2] for c in admin.calls[2:]] == [
        ("GET", "/admin/models/tabular/rollout"),
        ("GET", "/admin/models/tabular/traffic"),
        ("GET", "/admin/models/tabular/versions"),
        ("POST", "/admin/models/tabular/versions"),
        ("POST", "/admin/models/tabular/rollout"),
    ]  # the job ran again from the start, under the same number
    job = queue.get(dead.seq)
    assert job is not None and job.status == "succeeded" and job.attempts == 2


def test_a_job_waits_for_enough_captured_rows_before_it_trains(
    tmp_path: Path, pairs: PairCache
) -> None:
    fields = {"min_capture_rows": 100, "capture_wait_seconds": 30}
    settings = settings_for(tmp_path, pairs, fields, poll_seconds=0.05)
    runner, queue = runner_for(settings, Admin())
    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / ".capture-00000000000000000003-500.npz.tmp").write_bytes(b"")  # being written
    (capture / "notes-999.npz").write_bytes(b"")  # not a segment
    written: list[float] = []

    def gateway_writes_segments() -> None:
        for n, rows in enumerate((60, 41)):  # 101 rows once both are there
            time.sleep(0.4)
            (capture / f"capture-{n + 1:020d}-{rows}.npz").write_bytes(b"")
            written.append(time.time())

    assert capture_rows(capture) == 0
    writer = threading.Thread(target=gateway_writes_segments)
    writer.start()
    queue.add("msg_1", "tabular", retrain_body("tabular", capture).decode())
    job = queue.claim()
    assert job is not None
    asyncio.run(runner.execute(job))
    writer.join()

    done = queue.get(job.seq)
    assert done is not None and done.status == "succeeded", done
    assert capture_rows(capture) == 101
    started = float((settings.work_dir / "jobs" / "job-000001" / "out" / "started").read_text())
    assert started >= written[1]  # not after the first segment's 60 rows


def test_a_capture_that_stays_short_is_trained_on_after_the_wait_with_a_warning(
    tmp_path: Path, pairs: PairCache, caplog: pytest.LogCaptureFixture
) -> None:
    fields = {"min_capture_rows": 1000, "capture_wait_seconds": 0.3}
    settings = settings_for(tmp_path, pairs, fields, poll_seconds=0.05)
    runner, queue = runner_for(settings, Admin())
    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / f"capture-{1:020d}-7.npz").write_bytes(b"")
    queue.add("msg_1", "tabular", retrain_body("tabular", capture).decode())
    job = queue.claim()
    assert job is not None
    begun = time.monotonic()
    asyncio.run(runner.execute(job))

    done = queue.get(job.seq)
    assert done is not None and done.status == "succeeded", done
    assert time.monotonic() - begun >= 0.3
    assert "holds 7 rows after 0 s, fewer than 1000; training on them" in caplog.text


@pytest.mark.parametrize(
    ("rollout", "weights", "reason"),
    [
        (
            {"state": "running", "candidate": "3", "incumbent": "1"},
            None,
            "the rollout of version 3 is running; its outcome answers this request",
        ),
        (
            {"state": "paused", "candidate": "3", "incumbent": "1"},
            None,
            "the rollout of version 3 is paused",
        ),
        (
            {"state": "promoted", "candidate": "3", "incumbent": "1"},
            {"1": 0, "canary": 0, "3": 100},
            "version 1, which the request is about, no longer serves (serving: 3)",
        ),
    ],
)
def test_a_request_answered_by_a_rollout_is_ignored_without_training(
    tmp_path: Path,
    pairs: PairCache,
    rollout: dict[str, Any],
    weights: dict[str, int] | None,
    reason: str,
) -> None:
    settings = settings_for(tmp_path, pairs)
    admin = Admin(rollout=rollout, weights=weights)
    runner, queue = runner_for(settings, admin)
    queue.add("msg_1", "tabular", retrain_body("tabular").decode())  # about version 1
    job = queue.claim()
    assert job is not None
    asyncio.run(runner.execute(job))
    done = queue.get(job.seq)
    assert done is not None and done.status == "ignored" and done.stage == "check"
    assert reason in (done.error or ""), done.error
    assert all(method == "GET" for method, _, _ in admin.calls)  # nothing registered
    assert not (settings.work_dir / "jobs" / "job-000001" / "out").exists()  # nothing trained


def test_a_rolled_back_rollout_does_not_stop_the_next_retrain(
    tmp_path: Path, pairs: PairCache
) -> None:
    settings = settings_for(tmp_path, pairs)
    admin = Admin(rollout={"state": "rolled_back", "candidate": "3", "incumbent": "1"})
    runner, queue = runner_for(settings, admin)
    queue.add("msg_1", "tabular", retrain_body("tabular").decode())
    job = queue.claim()
    assert job is not None
    asyncio.run(runner.execute(job))
    done = queue.get(job.seq)
    assert done is not None and done.status == "succeeded", done
    assert admin.calls[-1][:2] == ("POST", "/admin/models/tabular/rollout")
