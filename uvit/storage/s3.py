"""The one rule for which S3 endpoint to talk to, and the one boto3 client factory.

Used by the artifact store (:mod:`uvit.storage.artifacts`), Ray Train's checkpoint storage
(:mod:`uvit.train.checkpoint_storage`), dataset downloads (:mod:`uvit.data.download`, image-folder
prefixes), the DVC remote (:func:`set_dvc_remote`, `uvit dvc-remote`) and anything else that
reaches S3. Credentials are never parameters:
boto3 (and pyarrow) read the usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``~/.aws``, an instance profile). Importing this module does not import boto3.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# Looked up in this order when no endpoint is given; unset everywhere means AWS itself.
ENDPOINT_ENV = ("UVIT_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

__all__ = ["ENDPOINT_ENV", "s3_client", "s3_endpoint_url", "set_dvc_remote"]


def s3_endpoint_url(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint URL: ``endpoint_url`` if given (e.g. a ``*.endpoint_url`` in params.yaml),
    else ``$UVIT_S3_ENDPOINT_URL``, else ``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL``
    (empty values count as unset), else None: AWS."""
    if endpoint_url:
        return endpoint_url
    return next((os.environ[var] for var in ENDPOINT_ENV if os.environ.get(var)), None)


def s3_client(
    endpoint_url: str | None = None,
    *,
    max_attempts: int = 8,
    connect_timeout: float = 10,
    read_timeout: float = 120,
    max_pool_connections: int = 10,
) -> Any:
    """A boto3 S3 client for :func:`s3_endpoint_url` (``endpoint_url``), retrying transient errors
    with exponential backoff ("standard" mode, ``max_attempts`` tries in all).

    Request checksums are botocore's default (a CRC of every upload request, checked by the
    server); a server too old for them is served with ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required``
    in the environment."""
    import boto3
    from botocore.config import Config

    url = s3_endpoint_url(endpoint_url)
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        # A custom endpoint (MinIO, moto, an IP) rarely resolves bucket subdomains.
        s3={"addressing_style": "path"} if url else None,
    )
    return boto3.client("s3", endpoint_url=url, config=config)


def set_dvc_remote(url: str, name: str = "s3", endpoint_url: str | None = None, root: str | Path = ".") -> str | None:
    """Make ``url`` (``s3://bucket/prefix``) the default DVC remote ``name`` of the repository at
    ``root``, talking to :func:`s3_endpoint_url` (``endpoint_url``); -> that endpoint (None: AWS).

    The remote's section of the committed ``.dvc/config`` becomes its URL alone; the endpoint goes
    to the git-ignored ``.dvc/config.local`` (it differs between machines), or is removed there
    when the rule gives AWS. DVC's own S3 client reads ``$AWS_ENDPOINT_URL_S3`` and
    ``$AWS_ENDPOINT_URL`` but not ``$UVIT_S3_ENDPOINT_URL``: writing the rule's answer makes
    all of them (and ``endpoint_url``) hold for ``dvc push`` / ``dvc pull``, in the rule's order,
    as they were when this ran (run it again after changing the endpoint).
    Raises ValueError for a URL that is not ``s3://``, :class:`subprocess.CalledProcessError`
    (with DVC's stderr) when DVC refuses (e.g. ``root`` is not a DVC repository)."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r}: an S3 remote is s3://bucket/prefix")
    endpoint = s3_endpoint_url(endpoint_url)
    remote = [sys.executable, "-m", "dvc", "remote"]
    pin = ["endpointurl", endpoint] if endpoint else ["--unset", "endpointurl"]
    for args in (["add", "--default", "--force", name, url], ["modify", "--local", name, *pin]):
        subprocess.run([*remote, *args], cwd=root, check=True, capture_output=True, text=True)
    return endpoint
