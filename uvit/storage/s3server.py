"""A loopback S3 (moto) for tests and local demos: nothing leaves 127.0.0.1.

    with local_s3() as endpoint:            # "http://127.0.0.1:PORT"
        ArtifactStore("s3://bucket/prefix", endpoint_url=endpoint)

Credentials are not set here (nothing global is touched): moto accepts any, conventionally
AWS_ACCESS_KEY_ID=AWS_SECRET_ACCESS_KEY=testing in the environment. Buckets must be created by the
caller. moto keeps its state in this process: everything stored is gone when the process ends.
From a shell, the same server is ``moto_server -H 127.0.0.1 -p PORT``.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator

# Variables that would point boto3 at a profile, a session or another endpoint than the loopback one:
# cleared wherever a test or demo talks to `local_s3` with throwaway credentials.
AWS_OVERRIDE_VARS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "UVIT_S3_ENDPOINT_URL",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def local_s3(port: int | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """Run moto's S3 (all of moto's services, in fact) on `host` in a thread; yield its URL.

    ``port=None`` lets the OS pick a free port when the server binds (no race with other
    processes). `host` is loopback unless a test binds it to an address of its own making (the
    bridge of :mod:`uvit.local_cluster`, which its hosts reach). The server is shut down when the
    block exits, also on error.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=port or 0, verbose=False)
    server.start()
    try:
        host, bound = server.get_host_and_port()
        yield f"http://{host}:{bound}"
    finally:
        server.stop()
