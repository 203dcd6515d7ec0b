"""The ceiling: the least a V2 JSON inference server can do, as a bare ASGI app.

No framework, orjson in and out, onnxruntime run inline on the event loop (a ~50 us model run
costs less than a hop to a thread). It answers `POST /v2/models/{name}/infer` (JSON tensors of
the numeric V2 datatypes, every input by name, any batch, `id` echoed) and
`/v2/health/{live,ready}`, so it doubles as a stand-in remote teacher:
`--delay-ms` makes it a slow one.

    python -m bench.ceiling --model M.onnx --name digits --port 8001 [--delay-ms 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.model import session

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_LIVE = orjson.dumps({"live": True})
_READY = orjson.dumps({"ready": True})
_NOT_FOUND = orjson.dumps({"error": "not found"})
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}


def build_app(onnx_path: Path, name: str, version: str = "1", delay_s: float = 0.0) -> App:
    """The ASGI app serving one ONNX model under `name`; `delay_s` is added to every infer."""
    sess = session(onnx_path)
    output_name = sess.get_outputs()[0].name
    infer_path = f"/v2/models/{name}/infer"

    def infer(body: bytes) -> tuple[int, bytes]:
        try:
            request = orjson.loads(body)
            feed = {
                tensor["name"]: np.asarray(
                    tensor["data"], dtype=_DTYPES[tensor["datatype"]]
                ).reshape(tensor["shape"])
                for tensor in request["inputs"]
            }
            logits = sess.run([output_name], feed)[0]
        except Exception as exc:  # the ceiling validates nothing; any failure is the caller's
            return 400, orjson.dumps({"error": f"{type(exc).__name__}: {exc}"})
        response: dict[str, Any] = {
            "model_name": name,
            "model_version": version,
            "outputs": [
                {
                    "name": output_name,
                    "datatype": "FP32",
                    "shape": list(logits.shape),
                    "data": logits.ravel(),
                }
            ],
        }
        if "id" in request:
            response["id"] = request["id"]
        return 200, orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == infer_path and scope["method"] == "POST":
            status, body = infer(await read_body(receive))
            if delay_s:
                await asyncio.sleep(delay_s)
        elif path == "/v2/health/ready":
            status, body = 200, _READY
        elif path == "/v2/health/live":
            status, body = 200, _LIVE
        else:
            status, body = 404, _NOT_FOUND
        await send({"type": "http.response.start", "status": status, "headers": _JSON})
        await send({"type": "http.response.body", "body": body})

    return app


async def read_body(receive: Receive) -> bytes:
    """The whole request body (uvicorn may deliver it in several messages)."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body
    chunks = [body]
    while message.get("more_body"):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


_MODEL_ENV, _NAME_ENV, _DELAY_ENV = (
    "BENCH_CEILING_MODEL",
    "BENCH_CEILING_NAME",
    "BENCH_CEILING_DELAY_MS",
)


def app_from_env() -> App:
    """The app of one of several uvicorn workers (`--workers`), from the variables `main` set."""
    delay_s = float(os.environ[_DELAY_ENV]) / 1000
    return build_app(Path(os.environ[_MODEL_ENV]), os.environ[_NAME_ENV], delay_s=delay_s)


def main(argv: list[str] | None = None) -> None:
    """Serve the ceiling app with uvicorn: httptools, uvloop, no access log."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="ONNX file")
    parser.add_argument("--name", default="digits", help="model name in the URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added to every infer")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)
    if args.workers > 1:
        # uvicorn's workers import the app themselves: they build it from these variables.
        os.environ.update(
            {_MODEL_ENV: str(args.model), _NAME_ENV: args.name, _DELAY_ENV: str(args.delay_ms)}
        )
        app: Any = "bench.ceiling:app_from_env"
    else:
        app = build_app(args.model, args.name, delay_s=args.delay_ms / 1000)
    uvicorn.run(
        app,
        factory=args.workers > 1,
        workers=args.workers,
        host=args.host,
        port=args.port,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
