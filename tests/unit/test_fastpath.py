"""URL matching of the fast path, against the same URLs FastAPI routes."""

from __future__ import annotations

import pytest

from kdgate.service.fastpath import match_infer


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/digits/infer", ("v2", "digits", None)),
        ("/v2/models/digits/versions/3/infer", ("v2", "digits", "3")),
        ("/v1/models/digits:predict", ("v1", "digits", None)),
        ("/v2/models//infer", None),
        ("/v2/models/digits/versions//infer", None),
        ("/v2/models/a/b/infer", None),
        ("/v2/models/digits/ready", None),
        ("/v1/models/:predict", None),
        ("/v1/models/a/b:predict", None),
        ("/v2/models/digits/infer/", None),
    ],
)
def test_match_infer(path: str, expected: tuple[str, str, str | None] | None) -> None:
    assert match_infer(path) == expected
