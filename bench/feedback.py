"""`python -m bench.feedback`: CPU cost of `FeedbackStore.put_many` on the event loop.

The request journal hands the store its predictions in bulk, 64 at a time; this times one such
call on a full store (50,000 single-row predictions of 10 classes, so every put also evicts the
oldest and drops the oldest tombstone: the steady state of a busy server). Prints the median
and the best of `--rounds` rounds of `--batches` calls, in microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid

import numpy as np
from prometheus_client import CollectorRegistry

from kdgate.monitoring.feedback import FeedbackStore
from kdgate.monitoring.metrics import Metrics
from kdgate.monitoring.recorder import FidelityRecorder

BATCH = 64
CLASSES = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback", description=__doc__)
    parser.add_argument("--max-size", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args(argv)
    store = FeedbackStore(
        FidelityRecorder(Metrics(CollectorRegistry()), "digits"),
        max_size=args.max_size,
        class_labels=[str(c) for c in range(CLASSES)],
    )
    rng = np.random.default_rng(0)

    def batch() -> list[tuple[str, str, np.ndarray, bool]]:
        # One [1, C] array per request, as the server's encoder hands them over.
        logits = rng.normal(size=(BATCH, 1, CLASSES)).astype(np.float32)
        return [(uuid.uuid4().hex, "1", logits[i].copy(), i % 10 == 0) for i in range(BATCH)]

    for _ in range(2 * args.max_size // BATCH + 1):  # full, with a full set of tombstones
        store.put_many(batch())
    per_call = []
    for _ in range(args.rounds):
        batches = [batch() for _ in range(args.batches)]
        start = time.perf_counter()
        for predictions in batches:
            store.put_many(predictions)
        per_call.append((time.perf_counter() - start) / args.batches * 1e6)
    result = {
        "put_many_us": {
            "median": round(statistics.median(per_call), 1),
            "best": round(min(per_call), 1),
        },
        "batch": BATCH,
        "held": len(store),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
