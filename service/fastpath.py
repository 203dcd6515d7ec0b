"""Recognise the inference URLs with string operations, before any router runs.

`match_infer` is the whole of the fast path's routing: two URL shapes, no regular expressions,
and a small cache in front, since a server sees the same few URLs over and over (a hit is a
dict lookup; the string work costs a few us once the request path has evicted it from the CPU
caches). Anything it does not recognise goes to FastAPI.
"""

from __future__ import annotations

from functools import lru_cache

V2_PREFIX = "/v2/models/"
V2_SUFFIX = "/infer"
V1_PREFIX = "/v1/models/"
V1_SUFFIX = ":predict"


@lru_cache(maxsize=1024)  # bounded: paths come from clients
def match_infer(path: str) -> tuple[str, str, str | None] | None:
    """(protocol, model, version or None) for an inference URL, else None.

    Accepts `/v2/models/{m}/infer`, `/v2/models/{m}/versions/{v}/infer` and
    `/v1/models/{m}:predict`; names may not be empty or contain '/'.
    """
    if path.startswith(V2_PREFIX) and path.endswith(V2_SUFFIX):
        parts = path[len(V2_PREFIX) : -len(V2_SUFFIX)].split("/")
        if len(parts) == 1 and parts[0]:
            return "v2", parts[0], None
        if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
            return "v2", parts[0], parts[2]
        return None
    if path.startswith(V1_PREFIX) and path.endswith(V1_SUFFIX):
        name = path[len(V1_PREFIX) : -len(V1_SUFFIX)]
        if name and "/" not in name:
            return "v1", name, None
    return None
