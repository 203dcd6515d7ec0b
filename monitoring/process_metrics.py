"""The metrics of the process itself: `process_*`, `python_*` and `kdgate_build_info`.

    register_process_metrics(registry)   # once per registry, where the app builds it

client_python's own collectors give what every Prometheus user expects on `/metrics` (CPU
seconds, resident memory, open file descriptors, GC counts, the interpreter); they are not on a
fresh `CollectorRegistry` unless registered. `kdgate_build_info{version,python,onnxruntime} 1` says
what runs, for joins such as `... * on (instance) group_left (version) kdgate_build_info`.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "unknown" when it is not installed."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def register_process_metrics(registry: CollectorRegistry) -> Gauge:
    """Register the process, platform and GC collectors and `kdgate_build_info` on `registry`.

    Returns the build-info gauge. Registering twice on one registry raises (duplicate series).
    """
    ProcessCollector(registry=registry)  # process_*: CPU, memory, fds, start time (Linux /proc)
    PlatformCollector(registry=registry)  # python_info
    GCCollector(registry=registry)  # python_gc_*
    build_info = Gauge(
        "kdgate_build_info",
        "Always 1; the labels say which kdgate, Python and onnxruntime this process runs.",
        ["version", "python", "onnxruntime"],
        registry=registry,
    )
    build_info.labels(
        package_version("kdgate"), platform.python_version(), package_version("onnxruntime")
    ).set(1)
    return build_info
