"""Response and request bodies as pydantic models, for the OpenAPI schema and metadata answers.

The infer endpoints do not parse with these (the codecs in protocol_v2/protocol_v1 are ~10x
faster); they document the wire format and validate nothing on the hot path.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Parameters = dict[str, Any]


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong and what was expected")


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ModelReady(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = Field(
        default=None, description="binary_data_size: bytes of this input after the JSON part"
    )
    data: list[Any] | None = Field(default=None, description="flat or nested, row-major")


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = Field(
        default=None, description="binary_data: true returns this output as raw bytes"
    )


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters | None = Field(
        default=None, description="binary_data_output: default for every output"
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    model_name: str
    model_version: str | None = None
    id: str
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class V1PredictRequest(BaseModel):
    instances: list[Any] = Field(description="one row of the model input per instance")


class V1PredictResponse(BaseModel):
    predictions: list[Any]


class V1ModelList(BaseModel):
    models: list[str]


class V1ModelStatus(BaseModel):
    name: str
    ready: bool


class V1Live(BaseModel):
    status: str


DOCUMENTED_BODIES: tuple[type[BaseModel], ...] = (InferenceRequest, V1PredictRequest)
