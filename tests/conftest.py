"""Shared test fixtures: a real S3 server on loopback (moto) and isolation from the host's AWS setup.

* Every ``AWS_*`` variable of the host is removed for the whole session (and boto3 is pointed at
  no config/credential files and no instance metadata), so no test can reach a real account.
* ``s3_server`` (session): a ``moto`` S3 server on 127.0.0.1, with ``AWS_ENDPOINT_URL`` and test
  credentials exported in ``os.environ`` so subprocesses (the CLI) inherit them.
* ``s3_bucket``: a fresh, uniquely named bucket, as ``"s3://<name>"``.
* Tests that do not request ``s3_server`` run with no S3 endpoint or credentials in the
  environment, even after the server has been started by an earlier test.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

from sitsflow import storage

_ISOLATION = {
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_REGION = "us-east-1"


def _aws_vars() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _set_aws_vars(values: dict[str, str]) -> None:
    """Make the ``AWS_*`` part of ``os.environ`` exactly ``values``."""
    for key in list(os.environ):
        if key.startswith("AWS_") and key not in values:
            del os.environ[key]
    os.environ.update(values)
    storage.reset_clients()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _no_host_aws() -> Iterator[None]:
    """Hide the host's AWS variables from the whole test session."""
    saved = _aws_vars()
    _set_aws_vars(dict(_ISOLATION))
    yield
    _set_aws_vars(saved)


@pytest.fixture(autouse=True)
def _aws_env_per_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests without ``s3_server`` see no endpoint or credentials (only the isolation vars)."""
    if "s3_server" in request.fixturenames:
        yield
        return
    saved = _aws_vars()
    _set_aws_vars(dict(_ISOLATION))
    yield
    _set_aws_vars(saved)


def _server_env(endpoint: str) -> dict[str, str]:
    """The ``AWS_*`` variables of the S3 server at ``endpoint``."""
    return {
        **_ISOLATION,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": _REGION,
    }


@pytest.fixture(scope="session")
def s3_server(_no_host_aws: None) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = _aws_vars()
    _set_aws_vars(_server_env(endpoint))
    try:
        yield endpoint
    finally:
        server.stop()
        _set_aws_vars(saved)


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, uniquely named bucket on the session's S3 server, as ``"s3://<name>"``.

    It points the environment at the server too: a test that asks for it late
    (``request.getfixturevalue``) was isolated from the server's variables when it started, even
    when an earlier test had started the server (the isolation is undone after the test)."""
    import boto3

    if _aws_vars() != _server_env(s3_server):
        _set_aws_vars(_server_env(s3_server))

    name = f"sitsflow-test-{uuid.uuid4().hex[:16]}"
    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_server, region_name=_REGION,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


# The real Kubernetes API server (etcd + apiextensions-apiserver with Argo's CRDs): tests/kube.py.
from kube import kube_namespace, kube_server  # noqa: E402,F401
