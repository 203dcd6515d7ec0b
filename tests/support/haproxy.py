"""A real HAProxy (Debian package) on 127.0.0.1 in front of kdgate replicas, for system tests.

    with haproxy(tmp, {"r1": "127.0.0.1:41001", "r2": ...}) as proxy:
        proxy.url    # http://127.0.0.1:<port>; answers carry x-kdgate-replica: <server name>

The config is `render_config`: round robin, HTTP health checks on `/v2/health/ready`, and
retries of failed requests on another replica (`retries`, `option redispatch`,
`retry-on all-retryable-errors`): every kdgate POST is safe to replay (inference is a function
of the body; feedback and the hook are keyed by ids), so a replica dying mid-request costs the
client nothing. The Alertmanager hook is the exception (`disable-l7-retry`): only a refused
connection is retried there, a 503 goes back to Alertmanager, whose own retries pace it.
HAProxy cannot report a port it chose, so a free one is picked just before it starts.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from stack.process import stop

REPLICA_HEADER = "x-kdgate-replica"


@dataclass
class HAProxy:
    process: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return "".join(self.log)


def render_config(port: int, servers: Mapping[str, str], *, check_ms: int = 300) -> str:
    """An haproxy.cfg balancing `servers` (name -> host:port) behind 127.0.0.1:`port`."""
    lines = "\n".join(
        f"    server {name} {address} check inter {check_ms}ms fall 2 rise 2"
        for name, address in servers.items()
    )
    return f"""\
global
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 30s
    timeout server 10s
    # A failed request goes to another replica: up to 3 more tries, each on another server.
    retries 3
    option redispatch 1
    retry-on all-retryable-errors
    # Wait for the whole body before picking a server: only a request HAProxy holds entirely
    # can be sent again.
    option http-buffer-request

frontend kdgate
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /v2/health/ready
    http-check expect status 200
    # Alertmanager retries the hook itself, after its 503, with its own backoff.
    http-request disable-l7-retry if {{ path_beg /v1/hooks/ }}
    http-response set-header {REPLICA_HEADER} %[srv_name]
{lines}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pump(process: subprocess.Popen[str], log: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        log.append(line)


@contextmanager
def haproxy(
    tmp: Path, servers: Mapping[str, str], *, deadline_seconds: float = 20.0
) -> Iterator[HAProxy]:
    """Run HAProxy over `servers` until exit; yields once every server passes its check."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        raise RuntimeError("haproxy is not installed: scripts/install-system-deps.sh")
    port = free_port()
    config = tmp / "haproxy.cfg"
    config.write_text(render_config(port, servers))
    subprocess.run([binary, "-c", "-f", str(config)], check=True, capture_output=True)
    process = subprocess.Popen(
        [binary, "-db", "-f", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log: list[str] = []
    pump = threading.Thread(target=_pump, args=(process, log), daemon=True)
    pump.start()
    proxy = HAProxy(process, port, log)
    try:
        deadline = time.monotonic() + deadline_seconds
        seen: set[str] = set()
        while not set(servers) <= seen:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy never reached {sorted(servers)}:\n{proxy.output()}")
            try:
                answer = httpx.get(f"{proxy.url}/v2/health/ready", timeout=2)
                seen.add(answer.headers.get(REPLICA_HEADER, ""))
            except httpx.HTTPError:
                time.sleep(0.1)
        yield proxy
    finally:
        stop(process, grace_seconds=5)
        pump.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
