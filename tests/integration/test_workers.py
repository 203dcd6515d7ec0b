"""`kdgate serve` with `server.workers: 2` on 127.0.0.1: real processes, real uvicorn.

Each worker is read on its own through its private Unix socket (`GET /families`), so the tests
see what every worker served independently of the merged `/metrics` they check.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stack.receiver import Receiver, webhook_receiver
from tests.integration.test_alertmanager_hook import PAYLOAD
from tests.support.gateway import TOKEN, write_slo_config
from tests.support.live_server import REPO, LiveServer, live_server

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"kdgate several workers test key").decode()
BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
RUN_DIR = re.compile(r"private sockets in (\S+)")
OK_V2 = {"model": "digits", "version": "1", "protocol": "v2", "code": "200"}


def write_workers_config(directory: Path, webhook_url: str | None, **server: Any) -> Path:
    """The SLO test config (default pair, teacher, drift every 2 s) with two workers and the
    state directory (traffic file, leader lock) in `directory`."""
    path = write_slo_config(directory, webhook_url=webhook_url, secret=SECRET)
    config = yaml.safe_load(path.read_text())
    config["server"] = {"host": "127.0.0.1", "port": 0, "workers": 2, "warmup_runs": 2, **server}
    config["admin"]["state_dir"] = str(directory / "state")
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(server: LiveServer) -> Path:
    match = RUN_DIR.search(server.output())
    assert match, server.output()
    return Path(match.group(1))


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("worker", timeout=5)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def families(server: LiveServer, index: int) -> dict[str, Any]:
    """Worker `index`'s own answer: pid, leader, its metric families (OSError while it is
    down). Read with the standard library's client, not the gateway's."""
    connection = _UnixConnection(run_dir(server) / f"worker-{index}.sock")
    try:
        connection.request("GET", "/families")
        response = connection.getresponse()
        assert response.status == 200
        answer: dict[str, Any] = json.loads(response.read())
        return answer
    finally:
        connection.close()


def children(pid: int) -> set[int]:
    """The live child processes of `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.parent.name))
    return found


def worker_value(answer: dict[str, Any], sample: str, labels: dict[str, str]) -> float:
    """A sample of one worker's families; 0 when the worker has no such series."""
    for family in answer["families"]:
        for name, found, value in family["samples"]:
            if name == sample and found == labels:
                return float(value)
    return 0.0


def scrape(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`/metrics` of the host, parsed by client_python's own parser."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).raise_for_status().text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def infer(url: str, attempts: int = 1) -> httpx.Response:
    """One inference on a fresh connection (so the kernel may pick either worker); transport
    errors are retried `attempts` - 1 times, as a client behind a load balancer would."""
    for attempt in range(attempts):
        try:
            with httpx.Client(timeout=10) as client:
                return client.post(f"{url}/v2/models/digits/infer", json=BODY)
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def poll(check: Callable[[], Any], deadline_seconds: float, what: str) -> Any:
    deadline = time.monotonic() + deadline_seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {deadline_seconds} s")
        time.sleep(0.1)


def served_by(server: LiveServer) -> list[float]:
    return [worker_value(families(server, i), "kdgate_requests_total", OK_V2) for i in (0, 1)]


def spread(server: LiveServer, count: int, *, concurrency: int = 8) -> list[httpx.Response]:
    """`count` inferences from `concurrency` clients at once: both workers get some."""
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda _: infer(server.url), range(count)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Receiver]]:
    directory = tmp_path_factory.mktemp("workers")
    with (
        webhook_receiver(SECRET) as receiver,
        live_server(write_workers_config(directory, receiver.url)) as server,
    ):
        yield server, receiver


def test_every_worker_serves_and_metrics_are_exact_across_workers(
    stack: tuple[LiveServer, Receiver],
) -> None:
    server, _ = stack
    pids = {families(server, i)["pid"] for i in (0, 1)}
    assert len(pids) == 2 and server.process.pid not in pids
    before_workers = served_by(server)
    before = scrape(server)
    answers = spread(server, 300)
    assert {a.status_code for a in answers} == {200}
    after_workers = served_by(server)
    # Both workers served part of the 300, and their own counts add up to all of them.
    deltas = [a - b for a, b in zip(after_workers, before_workers, strict=True)]
    assert min(deltas) > 0 and sum(deltas) == 300
    for _ in range(4):  # whichever worker answers the scrape, the host's figures
        merged = scrape(server)
        requests = key("kdgate_requests_total", OK_V2)
        assert merged[requests] - before.get(requests, 0) == 300
        count = key("kdgate_request_duration_seconds_count", {"model": "digits", "version": "1"})
        assert merged[count] - before.get(count, 0) == 300
        assert merged[key("kdgate_workers_scraped", {})] == 2
    # Every bucket is the sum of the workers' buckets (read from each worker on its own).
    workers = [families(server, i) for i in (0, 1)]
    merged = scrape(server)
    buckets = [
        (name, labels)
        for family in workers[0]["families"]
        if family["name"] == "kdgate_request_duration_seconds"
        for name, labels, _ in family["samples"]
        if name.endswith("_bucket")
    ]
    assert buckets
    for name, labels in buckets:
        assert merged[key(name, labels)] == sum(worker_value(w, name, labels) for w in workers)


def test_feedback_reaches_the_worker_that_served_the_request(
    stack: tuple[LiveServer, Receiver],
) -> None:
    server, _ = stack
    before = served_by(server)
    answers = spread(server, 60)
    after = served_by(server)
    assert min(a - b for a, b in zip(after, before, strict=True)) > 0  # ids on both workers
    ids = [a.headers["x-request-id"] for a in answers]
    labels = [{"id": request_id, "label": 3} for request_id in ids] + [
        {"id": "never-served", "label": 3}
    ]
    for _ in range(2):  # on either worker, every id is found where it was served
        with httpx.Client(timeout=10) as client:
            answer = client.post(f"{server.url}/v2/models/digits/feedback", json=labels).json()
        if answer["accepted"]:
            break
    assert answer["accepted"] == 60
    assert answer["unknown"] == ["never-served"]
    assert answer["duplicate"] == [] and answer["expired"] == []


def test_one_webhook_sender_and_one_drift_job_per_host(
    stack: tuple[LiveServer, Receiver],
) -> None:
    server, receiver = stack
    before = len(receiver.received())
    queued = []
    for n in range(4):  # each on a fresh connection: enqueued by either worker
        payload = copy.deepcopy(PAYLOAD)
        payload["alerts"][0]["fingerprint"] = f"{n:016x}"
        answer = httpx.post(
            f"{server.url}/v1/hooks/alertmanager",
            json=payload,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        queued += answer.json()["queued"]
    assert len(queued) == 4
    deliveries = receiver.wait_for(before + 4, deadline_seconds=30)[before:]
    assert sorted(d.id for d in deliveries) == sorted(queued)
    time.sleep(2)  # a few notifier rounds (poll 0.5 s): nothing is sent twice
    assert len(receiver.received()) == before + 4
    workers = [families(server, i) for i in (0, 1)]
    (leader,) = [w for w in workers if w["leader"]]
    (other,) = [w for w in workers if not w["leader"]]
    delivered = {"model": "digits", "outcome": "delivered"}
    assert worker_value(leader, "kdgate_retrain_requests_total", delivered) >= 4
    assert worker_value(other, "kdgate_retrain_requests_total", delivered) == 0
    # The drift job runs on the leader only (every 2 s once it holds 100 rows).
    spread(server, 300)

    def drift_on_leader() -> bool:
        leader_now = next(w for w in (families(server, i) for i in (0, 1)) if w["leader"])
        return any(
            f["name"] == "kdgate_input_drift_share" and f["samples"] for f in leader_now["families"]
        )

    poll(drift_on_leader, 60, "a drift result on the leader")
    other = next(w for w in (families(server, i) for i in (0, 1)) if not w["leader"])
    assert not any(
        f["name"] == "kdgate_input_drift_share" and f["samples"] for f in other["families"]
    )
    for _ in range(4):  # whichever worker answers, the leader's report
        report = httpx.get(f"{server.url}/v1/reports/drift", timeout=10)
        assert report.status_code == 200, report.text
        assert report.headers["content-type"].startswith("text/html")


def test_a_killed_leader_hands_over_and_is_restarted_without_failing_clients(
    tmp_path: Path,
) -> None:
    config = write_workers_config(tmp_path, None, graceful_shutdown_seconds=5)
    with live_server(config) as server:
        workers = [families(server, i) for i in (0, 1)]
        (leader,) = [i for i, w in enumerate(workers) if w["leader"]]
        old_pid = workers[leader]["pid"]
        failed: list[BaseException] = []
        stop = threading.Event()

        def clients() -> None:
            while not stop.is_set():
                try:
                    assert infer(server.url, attempts=3).status_code == 200
                except BaseException as exc:  # collected for the assertion
                    failed.append(exc)

        threads = [threading.Thread(target=clients) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            # The leader's drift child (drift every 2 s from 100 rows) must not outlive it.
            drift_child = poll(lambda: children(old_pid), 90, "the leader's drift child")
            os.kill(old_pid, signal.SIGKILL)

            def handed_over() -> bool:
                try:
                    return bool(families(server, 1 - leader)["leader"])
                except OSError:
                    return False

            poll(handed_over, 10, "the other worker taking the leader role")

            def restarted() -> bool:
                try:
                    answer = families(server, leader)
                except OSError:
                    return False
                return answer["pid"] != old_pid and not answer["leader"]

            poll(restarted, 60, "the killed worker restarted")
            poll(lambda: not any(Path(f"/proc/{p}").exists() for p in drift_child), 10, "orphan")
            served = served_by(server)
            poll(lambda: served_by(server)[leader] > served[leader], 30, "the new worker serving")
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert failed == []
        assert "exited with -9; restarting it" in server.output()
        # Stopped here, not by the fixture's 20 s: the new leader's first drift run (a fresh
        # child importing Evidently) may be in flight, and the stop waits for it.
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=5 + 35 + 10)


def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path) -> None:
    config_path = write_workers_config(tmp_path, None, graceful_shutdown_seconds=5)
    config = yaml.safe_load(config_path.read_text())
    # No drift run in flight: the monitoring stop waits for one, which is not the point here.
    config["drift"] = {"enabled": False}
    config_path.write_text(yaml.safe_dump(config))
    with live_server(config_path) as server:
        before = served_by(server)
        spread(server, 40)
        assert min(a - b for a, b in zip(served_by(server), before, strict=True)) > 0
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=5 + 35 + 5) == 0, server.output()[-5000:]
        assert time.monotonic() - started < 5 + 35
        assert server.output().count("Application shutdown complete.") == 2
        assert not run_dir(server).exists()  # the private sockets' directory is removed


def test_workers_that_die_at_start_end_the_supervisor_with_1(tmp_path: Path) -> None:
    config_path = write_workers_config(tmp_path, None)
    config = yaml.safe_load(config_path.read_text())
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"not an onnx model")
    card = json.loads(Path(config["models"][0]["students"][0]["card"]).read_text())
    card["file"] = model.name  # beside its card; the sha256 no longer matches
    card_path = tmp_path / "broken.card.json"
    card_path.write_text(json.dumps(card))
    config["models"][0]["students"][0]["card"] = str(card_path)
    config_path.write_text(yaml.safe_dump(config))
    process = subprocess.run(
        [sys.executable, "-m", "kdgate.service.cli", "serve", "--config", str(config_path)],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("KDGATE_")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 1, process.stderr
    assert "died 3 times in a row before serving" in process.stderr
