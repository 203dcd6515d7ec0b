import json
import threading
from pathlib import Path

from kdgate.service.retrain_queue import JobQueue

BODY = json.dumps({"type": "kdgate.retrain.requested", "data": {"model": "digits"}})


def test_a_webhook_id_is_stored_once(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")
    first, new = queue.add("msg_1", "digits", BODY)
    again, new_again = queue.add("msg_1", "digits", "{}")
    assert new and not new_again
    assert again == first and again.body == BODY  # the first body is kept
    assert [j.webhook_id for j in queue.jobs()] == ["msg_1"]


def test_one_job_at_a_time_per_model_others_run_alongside(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path / "jobs.sqlite3")
    a, _ = queue.add("msg_a", "digits", BODY)
    b, _ = queue.add("msg_b", "digits", BODY)
    c, _ = queue.add("msg_c", "tabular", BODY)
    ignored, _ = queue.add("msg_d", "text", BODY, status="ignored", error="a follow-up")
    assert [queue.claim().seq for _ in range(2)] == [a.seq, c.seq]  # type: ignore[union-attr]
    assert queue.claim() is None  # b waits for a; d is never run
    queue.finish(a.seq, "failed", "train: boom")
    claimed = queue.claim()
    assert claimed is not None and claimed.seq == b.seq and claimed.status == "running"
    assert claimed.attempts == 1 and claimed.started is not None
    assert queue.counts() == {"running": 2, "failed": 1, "ignored": 1}
    assert queue.get(ignored.seq).finished is not None  # type: ignore[union-attr]


def test_concurrent_claims_never_hand_out_one_model_twice(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    queue = JobQueue(path)
    for i in range(6):
        queue.add(f"msg_{i}", ["digits", "tabular"][i % 2], BODY)
    claimed: list[str] = []
    lock = threading.Lock()

    def claim() -> None:
        job = JobQueue(path).claim()  # own connection, as two processes would have
        if job is not None:
            with lock:
                claimed.append(job.model)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(claimed) == ["digits", "tabular"]


def test_a_restart_keeps_the_jobs_and_queues_an_interrupted_one_again(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = JobQueue(path)
    job, _ = first.add("msg_1", "tabular", BODY)
    first.add("msg_2", "digits", BODY)
    running = first.claim()
    assert running is not None
    first.set_stage(running.seq, "register", version="2")
    first.set_registered(running.seq, "2")
    # The process dies here. The next one finds both jobs:
    second = JobQueue(path)
    (recovered,) = second.recover(max_attempts=2)
    assert recovered.requeued and recovered.registered == "2"  # to be removed by the runner
    assert second.get(job.seq).status == "queued"  # type: ignore[union-attr]
    again = second.claim()
    assert again is not None and again.seq == job.seq and again.attempts == 2
    assert again.registered is None and again.version == "2"
    # ... and dies again: two runs were the limit, the job fails.
    third = JobQueue(path)
    (gave_up,) = third.recover(max_attempts=2)
    assert not gave_up.requeued
    failed = third.get(job.seq)
    assert failed is not None and failed.status == "failed"
    assert "interrupted by a restart" in (failed.error or "")
    assert third.recover(max_attempts=2) == []
    assert {j.webhook_id: j.status for j in third.jobs()} == {"msg_1": "failed", "msg_2": "queued"}
