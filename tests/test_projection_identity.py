"""RemoteProjection (protege.teacher.projection) uses an output projection only when its bytes hash to the
sha256 the server's /v1/info named: a teacher swapped between the two requests stops the run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from protege import wire
from protege.teacher.projection import RemoteProjection, TeacherChanged


def _served(weight: torch.Tensor):
    """(the /v1/info entry, a GET of /v1/output_projection) as a server holding `weight` answers them:
    the body is wire.encode_projection's real document; `check` is the client's own reply check."""
    pieces, sha = wire.encode_projection(weight)
    body = b"".join(bytes(p) for p in pieces)
    return {"output_projection": {"sha256": sha}}, (lambda path, check: check(SimpleNamespace(content=body)))


def test_the_named_projection_loads_and_another_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    info, get_first = _served(first)
    assert torch.equal(RemoteProjection(["http://t"]).load(info, get_first), first)
    _, get_second = _served(second)  # the server now holds another teacher
    with pytest.raises(TeacherChanged, match=info["output_projection"]["sha256"][:16]):
        RemoteProjection(["http://t"], cache_dir=str(tmp_path)).load(info, get_second)
    assert not list(tmp_path.iterdir()), "the other teacher's projection was cached under the named sha256"
