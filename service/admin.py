"""The admin API: traffic splits and student versions of each model, at run time.

    GET    /admin/models/{m}/traffic             the model's `traffic` object
    PUT    /admin/models/{m}/traffic             change weights / sticky_header / shadow_fraction
    POST   /admin/models/{m}/traffic/promote     {"version": v}: v gets 100%
    POST   /admin/models/{m}/traffic/rollback    back to the weights before the last change
    GET    /admin/models/{m}/versions            loaded versions: weight, card, sha256
    POST   /admin/models/{m}/versions            {"card": path[, "version": v]}: load, verify, warm
    DELETE /admin/models/{m}/versions/{v}        stop routing to v, wait for its requests
    POST   /admin/models/{m}/rollout             {"candidate": v[, "steps", "criteria"]}: start
    GET    /admin/models/{m}/rollout             the rollout, with the latest analysis
    POST   /admin/models/{m}/rollout/pause|resume|abort

Every route needs `Authorization: Bearer <admin.token>`: none or malformed -> 401, another
token -> 403 (constant-time compare). While `admin.token` is null the routes answer 404 saying
the admin API is off. Bodies are read like inference bodies (`server.max_body_bytes`: 413;
`server.body_timeout_seconds`: 408), after the token is checked, then validated here (400).
service/traffic.py writes the changes to the traffic file every process follows, applies and
audits them; where that file is read-only (a ConfigMap) the changing routes answer 409.
Rollouts (service/rollouts.py) change it the same way; while one runs or is paused the weight
changes above answer 409.
"""

# No `from __future__ import annotations`: FastAPI must see `Who` (built around the closure
# `caller`) as a real object, which a string annotation naming a local cannot give it.
import hashlib
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from kdgate.service.auth import check_bearer
from kdgate.service.endpoints import JsonResponse
from kdgate.service.errors import InvalidInput
from kdgate.service.inference import BodyDeadline, read_body
from kdgate.service.rollouts import Rollouts
from kdgate.service.settings import Settings
from kdgate.service.traffic import Caller, TrafficControl, problems

_Body = TypeVar("_Body", bound=BaseModel)

ADMIN_OFF = "the admin API is off: set admin.token (KDGATE_ADMIN__TOKEN) to turn it on"


class TrafficChange(BaseModel):
    """PUT body: the fields of the `traffic` object to change; those left out keep their value."""

    model_config = ConfigDict(extra="forbid", strict=True)

    weights: dict[str, int] | None = Field(
        default=None, description="percent per version, summing to 100; versions left out get 0"
    )
    sticky_header: str | None = None
    shadow_fraction: float | None = None


class Promotion(BaseModel):
    """POST .../traffic/promote body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: str


class NewVersion(BaseModel):
    """POST .../versions body: a model card path on the server (its ONNX file beside it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    card: str = Field(min_length=1, description="card path; relative to the server's cwd")
    version: str | None = Field(default=None, description="default: the card's version")


class RolloutRequest(BaseModel):
    """POST .../rollout body: the candidate version; steps and criteria override the model's
    `models[].rollout` (criteria key by key)."""

    model_config = ConfigDict(extra="forbid")

    candidate: str = Field(min_length=1, description="a loaded version of the model")
    steps: list[str | int | dict[str, Any]] | None = Field(
        default=None, description='e.g. ["dark", 5, 25, 100]; the last is 100'
    )
    criteria: dict[str, Any] | None = Field(default=None, description="see docs/rollouts.md")


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for a token, for audit lines."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI `requestBody` for a route that reads and validates `model` itself."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def build_admin_router(
    settings: Settings, control: TrafficControl, rollouts: Rollouts
) -> APIRouter:
    """The /admin routes, bound to one app's settings, traffic control and rollouts."""

    async def caller(request: Request) -> Caller:
        token = settings.admin.token
        if token is None:
            raise HTTPException(404, ADMIN_OFF)
        check_bearer(request.headers.get("authorization"), token)
        address = request.client.host if request.client else "unknown"
        return Caller(token_fingerprint(token.get_secret_value()), address)

    deadline = BodyDeadline(settings.server.body_timeout_seconds)

    async def body(request: Request, model: type[_Body]) -> _Body:
        raw = await read_body(
            request.receive,
            settings.server.max_body_bytes,
            request.headers.get("content-length", "").encode() or None,
            deadline,
        )
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidInput(f"invalid request: {problems(exc)}") from None

    Who = Annotated[Caller, Depends(caller)]
    api = APIRouter(prefix="/admin/models/{model}", tags=["admin"])

    @api.get("/traffic")
    async def get_traffic(model: str, _: Who) -> JsonResponse:
        """The model's `traffic` object: weights of every loaded version, header, fraction."""
        return JsonResponse(control.state.router(model).traffic.model_dump())

    @api.put("/traffic", openapi_extra=documented_body(TrafficChange))
    async def put_traffic(model: str, request: Request, who: Who) -> JsonResponse:
        """Change the split; validated (400 says why), saved, then applied in one swap."""
        changes = (await body(request, TrafficChange)).model_dump(exclude_unset=True)
        return JsonResponse((await control.set_traffic(model, changes, who)).model_dump())

    @api.post("/traffic/promote", openapi_extra=documented_body(Promotion))
    async def promote(model: str, request: Request, who: Who) -> JsonResponse:
        """Send 100% of the split to one loaded version."""
        version = (await body(request, Promotion)).version
        return JsonResponse((await control.promote(model, version, who)).model_dump())

    @api.post("/traffic/rollback")
    async def rollback(model: str, who: Who) -> JsonResponse:
        """Restore the weights in force before the last weight change."""
        return JsonResponse((await control.rollback(model, who)).model_dump())

    @api.get("/versions")
    async def versions(model: str, _: Who) -> JsonResponse:
        """Loaded versions with weight, card path and sha256, and the previous weights."""
        return JsonResponse(control.versions(model))

    @api.post("/versions", status_code=201, openapi_extra=documented_body(NewVersion))
    async def load_version(model: str, request: Request, who: Who) -> JsonResponse:
        """Load a version from its card (sha256 verified, warmed up); it starts at weight 0."""
        new = await body(request, NewVersion)
        loaded = await control.load_version(model, Path(new.card), new.version, who)
        return JsonResponse(loaded, status_code=201)

    @api.delete("/versions/{version}")
    async def remove_version(model: str, version: str, who: Who) -> JsonResponse:
        """Remove a version with weight 0 once the requests it is serving have finished."""
        return JsonResponse(await control.remove_version(model, version, who))

    @api.post("/rollout", status_code=201, openapi_extra=documented_body(RolloutRequest))
    async def start_rollout(model: str, request: Request, who: Who) -> JsonResponse:
        """Start a rollout of a loaded version (409 while one runs, 404 unknown version)."""
        asked = await body(request, RolloutRequest)
        started = await rollouts.begin(
            model, asked.candidate, steps=asked.steps, criteria=asked.criteria, caller=who
        )
        return JsonResponse(started, status_code=201)

    @api.get("/rollout")
    async def get_rollout(model: str, _: Who) -> JsonResponse:
        """The model's latest rollout: steps, state, weights and the latest analysis."""
        return JsonResponse(rollouts.describe(model))

    @api.post("/rollout/pause")
    async def pause_rollout(model: str, who: Who) -> JsonResponse:
        """Hold the running step (weights stay)."""
        return JsonResponse(await rollouts.pause(model, who))

    @api.post("/rollout/resume")
    async def resume_rollout(model: str, who: Who) -> JsonResponse:
        """Go on with the paused step; its evidence starts afresh."""
        return JsonResponse(await rollouts.resume(model, who))

    @api.post("/rollout/abort")
    async def abort_rollout(model: str, who: Who) -> JsonResponse:
        """End the rollout: the incumbent serves all the traffic again."""
        return JsonResponse(await rollouts.abort(model, who))

    return api
