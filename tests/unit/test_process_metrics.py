"""monitoring/process_metrics.py: process_*, python_* and kdgate_build_info on a given registry."""

from __future__ import annotations

import platform
from importlib.metadata import version
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from kdgate.monitoring.process_metrics import package_version, register_process_metrics


def test_process_python_and_build_info_on_the_given_registry() -> None:
    registry = CollectorRegistry()
    register_process_metrics(registry)
    rss = registry.get_sample_value("process_resident_memory_bytes")
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    vm_rss = int(status["VmRSS"].split()[0]) * 1024
    assert rss is not None and abs(rss - vm_rss) < 0.2 * vm_rss
    assert (registry.get_sample_value("process_open_fds") or 0) >= 3  # stdin, stdout, stderr
    python = platform.python_version_tuple()
    info = {
        "implementation": platform.python_implementation(),
        "version": platform.python_version(),
    }
    info |= {"major": python[0], "minor": python[1], "patchlevel": python[2]}
    assert registry.get_sample_value("python_info", info) == 1
    assert registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
    build = {
        "version": version("kdgate"),
        "python": platform.python_version(),
        "onnxruntime": version("onnxruntime"),
    }
    assert registry.get_sample_value("kdgate_build_info", build) == 1


def test_registering_twice_on_one_registry_is_refused() -> None:
    registry = CollectorRegistry()
    register_process_metrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register_process_metrics(registry)


def test_a_missing_package_reads_unknown() -> None:
    assert package_version("kdgate-no-such-distribution") == "unknown"
