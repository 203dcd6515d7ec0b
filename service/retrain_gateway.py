"""The gateway's admin API as the retrain worker uses it: versions, register, rollout, remove.

    gateway = Gateway(httpx.AsyncClient(base_url=url, headers=auth), timeout_seconds=120)
    v = await gateway.next_version("digits")           # "2" when 1 is loaded
    await gateway.register("digits", card_path, v)     # POST /admin/models/digits/versions
    await gateway.start_rollout("digits", v, {})       # POST /admin/models/digits/rollout

Any answer but the expected 2xx, and any transport error, raises `GatewayError` naming the call,
the status and the gateway's own `error` text (never the token: it is in the client's headers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx


class GatewayError(Exception):
    """An admin call failed; `status` is the HTTP status (None: no answer)."""

    def __init__(self, call: str, status: int | None, reason: str) -> None:
        self.status = status
        super().__init__(f"{call}: {'HTTP ' + str(status) if status else 'no answer'}: {reason}")


class Gateway:
    """Admin calls over an injected client whose base URL and bearer token are set."""

    def __init__(self, client: httpx.AsyncClient, *, timeout_seconds: float) -> None:
        self._client = client
        self._timeout = timeout_seconds

    async def versions(self, model: str) -> dict[str, str | None]:
        """Every version of `model` the gateway knows, with the sha256 of its ONNX file (None
        for a version that is configured but not loaded)."""
        body = await self._call("GET", f"/admin/models/{model}/versions")
        listed = body.get("versions")
        if not isinstance(listed, list):
            raise GatewayError(f"GET /admin/models/{model}/versions", 200, "no versions list")
        return {str(v["version"]): v.get("sha256") for v in listed if isinstance(v, dict)}

    async def next_version(self, model: str) -> str:
        """One more than the highest numeric version of `model` ("1" when there is none).

        Non-numeric versions ("canary") are skipped: they have no successor to compute.
        """
        numbers = [int(v) for v in await self.versions(model) if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    async def rollout(self, model: str) -> dict[str, Any] | None:
        """The model's rollout record (running, paused or ended); None when it has none, or
        when the gateway has no rollout routes (404/405)."""
        try:
            return await self._call("GET", f"/admin/models/{model}/rollout")
        except GatewayError as exc:
            if exc.status in (404, 405):
                return None
            raise

    async def weights(self, model: str) -> dict[str, int]:
        """The model's traffic weights by version."""
        body = await self._call("GET", f"/admin/models/{model}/traffic")
        weights = body.get("weights")
        if not isinstance(weights, dict):
            raise GatewayError(f"GET /admin/models/{model}/traffic", 200, "no weights")
        return {str(v): int(w) for v, w in weights.items()}

    async def register(self, model: str, card: Path, version: str) -> dict[str, Any]:
        """Load `card` (a path the gateway can read) as `version`; it starts at weight 0."""
        body = {"card": str(card), "version": version}
        return await self._call("POST", f"/admin/models/{model}/versions", body)

    async def start_rollout(
        self, model: str, version: str, overrides: dict[str, Any]
    ) -> dict[str, Any]:
        """Start the rollout of `version` (`overrides`: steps, criteria; else the model's)."""
        body = {**overrides, "candidate": version}
        return await self._call("POST", f"/admin/models/{model}/rollout", body)

    async def remove(self, model: str, version: str) -> dict[str, Any]:
        """Remove `version` (weight 0) once its requests have finished."""
        return await self._call("DELETE", f"/admin/models/{model}/versions/{version}")

    async def _call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        call = f"{method} {path}"
        try:
            response = await self._client.request(method, path, json=body, timeout=self._timeout)
        except httpx.HTTPError as exc:
            raise GatewayError(call, None, f"{type(exc).__name__}: {exc}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not response.is_success:
            reason = answer.get("error") if isinstance(answer, dict) else None
            raise GatewayError(call, response.status_code, str(reason or response.text[:300]))
        return answer if isinstance(answer, dict) else {"answer": answer}
