"""The teacher server: an ASGI app over a micro-batched scoring engine (see app.py)."""

from protege.server.app import ServerSettings, create_app
from protege.server.backends import HFBackend
from protege.server.batch import Batch

__all__ = ["Batch", "HFBackend", "ServerSettings", "create_app"]
