"""uvit.storage: where run artifacts live outside the working tree.

- :mod:`uvit.storage.artifacts`: :class:`ArtifactStore`, a versioned, content-addressed store of
  runs (``<root>/<benchmark>/<run_id>/...`` + ``run_manifest.json`` with sha256 and size of every
  file) on S3 (AWS, MinIO, moto) or a local directory, verified on upload and on download;
  transfers through boto3's managed transfer (multipart uploads, parallel ranged downloads).
- :mod:`uvit.storage.s3`: the one rule for the S3 endpoint (:func:`~uvit.storage.s3.s3_endpoint_url`)
  and the one boto3 client factory (:func:`~uvit.storage.s3.s3_client`).
- :mod:`uvit.storage.s3server`: :func:`local_s3`, a loopback moto S3 server for tests and demos.

Datasets and pipeline outputs are versioned by DVC (its S3 remote: ``infra/README.md``); this
store is for publishing and fetching whole runs (checkpoints, samples, metrics) by id: the
pipeline's `publish` stage (:mod:`uvit.stages.publish`, `uvit publish` / `uvit fetch`) uses it.
Importing this package imports neither boto3 nor moto.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ArtifactIntegrityError", "ArtifactRef", "ArtifactStore", "free_port", "local_s3"]

if TYPE_CHECKING:
    from .artifacts import ArtifactIntegrityError, ArtifactRef, ArtifactStore
    from .s3server import free_port, local_s3


def __getattr__(name: str) -> Any:
    if name in ("ArtifactIntegrityError", "ArtifactRef", "ArtifactStore"):
        from . import artifacts

        return getattr(artifacts, name)
    if name in ("free_port", "local_s3"):
        from . import s3server

        return getattr(s3server, name)
    raise AttributeError(name)
