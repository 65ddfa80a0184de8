"""The HTTP layer of the similar-items service (FastAPI); the logic lives in `visrec.online.service`."""

from serving.app import create_app

__all__ = ["create_app"]
