"""The naive server: what a first FastAPI + pydantic V2 endpoint looks like.

Pydantic models for the V2 request and response, an `async def` handler, the same onnxruntime
session options as the ceiling and kdgate. It is the floor kdgate must beat by 2x.

    python -m bench.naive --model M.onnx --name digits --port 8002
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from bench.model import session


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]
    parameters: dict[str, Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None
    parameters: dict[str, Any] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


def build_app(onnx_path: Path, name: str, version: str = "1") -> FastAPI:
    """The FastAPI app serving one ONNX model under `name`."""
    sess = session(onnx_path)
    input_name = sess.get_inputs()[0].name
    output_name = sess.get_outputs()[0].name
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{model_name}/infer", response_model=InferenceResponse)
    async def infer(model_name: str, request: InferenceRequest) -> InferenceResponse:
        if model_name != name:
            raise HTTPException(404, f"unknown model {model_name}")
        tensor = request.inputs[0]
        rows = np.asarray(tensor.data, dtype=np.float32).reshape(tensor.shape)
        logits = sess.run([output_name], {input_name: rows})[0]
        return InferenceResponse(
            model_name=name,
            model_version=version,
            id=request.id,
            outputs=[
                ResponseOutput(
                    name=output_name,
                    shape=list(logits.shape),
                    datatype="FP32",
                    data=logits.ravel().tolist(),
                )
            ],
        )

    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the naive app with uvicorn (same server options as the ceiling)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="ONNX file")
    parser.add_argument("--name", default="digits", help="model name in the URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(args.model, args.name),
        host=args.host,
        port=args.port,
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
