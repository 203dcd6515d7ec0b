"""`kdgate loadgen`: digits traffic at a fixed rate, optionally drifted, optionally labelled.

    kdgate loadgen --url http://127.0.0.1:8000 --rate 50 --duration 60 --drift invert
    stats = await run_load(LoadConfig(url=..., rate=50, duration_seconds=10, drift="noise"))

Rows are drawn (with replacement) from the model's reference sample (`reference.npz`: `inputs`
[N, 64] raw pixel values in [0, 16], `labels` [N]) and sent as Open Inference Protocol V2 JSON
with an `id`. Drift transforms, for demos and tests of the drift and fidelity SLOs:

- `noise`: add Gaussian noise of standard deviation `strength` x 16, clipped to [0, 16];
- `invert`: 16 - x (a negative image);
- `shift`: move the 8x8 image `round(strength x 4)` pixels (at least 1) right and down.

With `feedback` > 0 that share of answered requests gets its true label posted to
`POST /v2/models/{model}/feedback` as `[{"id", "label"}]`; a 404 (no feedback endpoint on that
server) is counted, not fatal. Requests are issued on a schedule (the i-th at i / rate seconds),
not one after another, so a slow server sees the offered rate rather than a slower one.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import numpy.typing as npt

from kdgate.service.settings import default_models_dir

Drift = Literal["none", "noise", "invert", "shift"]
DRIFTS: tuple[Drift, ...] = ("none", "noise", "invert", "shift")
PIXEL_MAX = 16.0
SIDE = 8


def drifted(
    rows: npt.NDArray[np.float32], drift: Drift, strength: float, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """`rows` [n, 64] with the `drift` transform applied (a new array; values stay in [0, 16])."""
    if drift == "none":
        return rows.copy()
    if drift == "invert":
        return (PIXEL_MAX - rows).astype(np.float32)
    if drift == "noise":
        noisy = rows + rng.normal(0.0, strength * PIXEL_MAX, rows.shape)
        return np.clip(noisy, 0.0, PIXEL_MAX).astype(np.float32)
    if rows.shape[1] != SIDE * SIDE:
        raise ValueError(f"shift needs 8x8 images (64 columns), got {rows.shape[1]}")
    k = max(1, round(strength * SIDE / 2))
    images = rows.reshape(-1, SIDE, SIDE)
    moved = np.zeros_like(images)
    moved[:, k:, k:] = images[:, : SIDE - k, : SIDE - k]
    return moved.reshape(len(rows), -1)


@dataclass(frozen=True)
class LoadConfig:
    """What to send: where, how fast (requests/s), for how long (s), and how drifted."""

    url: str
    model: str = "digits"
    rate: float = 50.0
    duration_seconds: float = 10.0
    batch: int = 1
    drift: Drift = "none"
    strength: float = 0.3
    feedback: float = 0.0
    reference: Path = field(default_factory=lambda: default_models_dir() / "digits/reference.npz")
    concurrency: int = 32
    seed: int = 0
    timeout_seconds: float = 10.0


@dataclass
class LoadStats:
    """What happened: counts per outcome and client-side latencies (seconds) of answered calls."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    feedback_sent: int = 0
    feedback_ok: int = 0
    feedback_missing: int = 0  # the server has no feedback endpoint (404)
    # What went wrong, by HTTP status ("503") or exception name ("ReadTimeout").
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def failed(self, kind: str) -> None:
        """Count one failed request of `kind`."""
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def quantile(self, q: float) -> float:
        """Latency quantile in seconds (NaN without answers)."""
        return float(np.quantile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> str:
        return (
            f"sent {self.sent}, ok {self.ok}, errors {self.errors}; feedback sent "
            f"{self.feedback_sent}, ok {self.feedback_ok}, 404 {self.feedback_missing}; "
            f"latency p50 {self.quantile(0.5) * 1e3:.2f} ms, p95 {self.quantile(0.95) * 1e3:.2f} ms"
        )


def _body(request_id: str, rows: npt.NDArray[np.float32]) -> dict[str, object]:
    return {
        "id": request_id,
        "inputs": [
            {
                "name": "input",
                "shape": list(rows.shape),
                "datatype": "FP32",
                "data": rows.ravel().tolist(),
            }
        ],
    }


async def run_load(config: LoadConfig, *, stop: asyncio.Event | None = None) -> LoadStats:
    """Send `rate` requests/s for `duration_seconds` (or until `stop` is set); return the stats."""
    with np.load(config.reference, allow_pickle=False) as data:
        inputs = np.asarray(data["inputs"], dtype=np.float32)
        labels = np.asarray(data["labels"], dtype=np.int64)
    rng = np.random.default_rng(config.seed)
    stats = LoadStats()
    limit = asyncio.Semaphore(config.concurrency)
    infer_url = f"{config.url}/v2/models/{config.model}/infer"
    feedback_url = f"{config.url}/v2/models/{config.model}/feedback"
    total = max(1, round(config.rate * config.duration_seconds))

    async def one(client: httpx.AsyncClient, index: int) -> None:
        picks = rng.integers(0, len(inputs), config.batch)
        rows = drifted(inputs[picks], config.drift, config.strength, rng)
        request_id = f"loadgen-{config.seed}-{index}"
        async with limit:
            started = time.perf_counter()
            try:
                response = await client.post(infer_url, json=_body(request_id, rows))
            except httpx.HTTPError as exc:
                stats.failed(type(exc).__name__)
                return
            if response.status_code != 200:
                stats.failed(str(response.status_code))
                return
            stats.ok += 1
            stats.latencies.append(time.perf_counter() - started)
            if config.feedback and rng.random() < config.feedback:
                # One label per request id: the first row's (batch 1 is the labelled case).
                stats.feedback_sent += 1
                feedback = [{"id": request_id, "label": int(labels[picks[0]])}]
                try:
                    answer = await client.post(feedback_url, json=feedback)
                except httpx.HTTPError:
                    return
                if answer.status_code == 404:
                    stats.feedback_missing += 1
                elif answer.is_success:
                    stats.feedback_ok += 1

    limits = httpx.Limits(max_connections=config.concurrency)
    async with httpx.AsyncClient(timeout=config.timeout_seconds, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        for index in range(total):
            if stop is not None and stop.is_set():
                break
            # Always yield, also when behind schedule: the requests (and `stop`) must get to run.
            await asyncio.sleep(max(0.0, start + index / config.rate - time.monotonic()))
            stats.sent += 1
            tasks.append(asyncio.create_task(one(client, index)))
        await asyncio.gather(*tasks)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    """`kdgate loadgen ...`; prints a one-line summary; exit 1 when no request succeeded."""
    parser = argparse.ArgumentParser(prog="kdgate loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="kdgate base URL")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--batch", type=int, default=1, help="rows per request")
    parser.add_argument("--drift", choices=DRIFTS, default="none")
    parser.add_argument("--strength", type=float, default=0.3, help="noise sd / 16, shift / 4")
    parser.add_argument("--feedback", type=float, default=0.0, help="share of requests labelled")
    parser.add_argument("--reference", type=Path, help="reference.npz (default: models/digits)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.batch < 1 or not 0 <= args.feedback <= 1:
        parser.error("need rate > 0, duration > 0, batch >= 1 and feedback in [0, 1]")
    config = LoadConfig(
        url=args.url.rstrip("/"),
        model=args.model,
        rate=args.rate,
        duration_seconds=args.duration,
        batch=args.batch,
        drift=args.drift,
        strength=args.strength,
        feedback=args.feedback,
        concurrency=args.concurrency,
        seed=args.seed,
        **({"reference": args.reference} if args.reference else {}),
    )
    stats = asyncio.run(run_load(config))
    print(stats.summary())
    return 0 if stats.ok else 1
