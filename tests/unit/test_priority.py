from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from kdgate.monitoring.priority import LOWEST, lowest_process_priority, lowest_thread_priority
from kdgate.monitoring.teacher import LocalOnnxTeacher


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_a_pool_thread_is_lowered_and_the_rest_of_the_process_is_not() -> None:
    before = thread_nice()
    with ThreadPoolExecutor(1, initializer=lowest_thread_priority) as pool:
        assert pool.submit(thread_nice).result(timeout=10) == LOWEST
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(thread_nice).result(timeout=10) == before
    assert thread_nice() == before < LOWEST


def test_a_spawned_child_process_is_lowered() -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=lowest_process_priority) as pool:
        assert pool.submit(os.nice, 0).result(timeout=60) == LOWEST
    assert os.nice(0) < LOWEST


def test_the_local_teacher_runs_on_a_lowered_thread() -> None:

    model = (Path(__file__).resolve().parents[2] / "models/digits/teacher.onnx").read_bytes()
    teacher = LocalOnnxTeacher(model, name="t", version="1")
    assert teacher._executor.submit(thread_nice).result(timeout=10) == LOWEST
    logits = asyncio.run(teacher.infer({"input": np.zeros((2, 64), np.float32)}))
    asyncio.run(teacher.aclose())
    assert logits.shape == (2, 10)
