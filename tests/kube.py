"""A real Kubernetes API server for custom resources, started by the tests on 127.0.0.1.

``etcd`` and ``apiextensions-apiserver`` (k8s.io/apiextensions-apiserver: the Kubernetes API
machinery that serves CustomResourceDefinitions and their objects, and no core kinds) come from
``.ci/kube-apiserver.sh``, which builds them into ``$SITSFLOW_KUBE_DIR/bin`` (default
``~/.cache/sitsflow-kube/bin``). Argo's full CRDs (tests/data/argo-crds, Apache-2.0) are installed
with server-side apply, so Workflow and WorkflowTemplate objects are validated by their real
OpenAPI schemas and CEL rules, and can be created, read, watched and patched (status too).

Network: both programs listen on 127.0.0.1 only, on free ports, in the tests' own network
namespace (the recipe in the reference runs them inside ``unshare --net``, but a server in
another namespace could not be reached from the test process; binding to loopback keeps all the
traffic on the machine). The API server serves TLS with a certificate for 127.0.0.1 signed by a
throw-away CA, and authenticates a client certificate in the ``system:masters`` group; all keys
are made by ``openssl`` in the session's temporary folder.

Fixtures (import them in conftest.py: ``from kube import kube_server, kube_namespace``):

* ``kube_server`` (session): a :class:`KubeServer` (``kubeconfig`` path, ``url``,
  ``api_client()``). Where the binaries are missing it SKIPS with the reason and the command
  that builds them, except under CI (``CI=true``), where it FAILS.
* ``kube_namespace``: a fresh namespace name per test (the server runs no namespace admission, so
  custom objects can be created in any namespace without a Namespace object).

Tests that use them carry ``@pytest.mark.kube``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).resolve().parent / "data" / "argo-crds"
BUILD_SCRIPT = ".ci/kube-apiserver.sh"
START_TIMEOUT_S = 180.0


def kube_bin_dir() -> Path:
    """Where ``.ci/kube-apiserver.sh`` puts etcd and apiextensions-apiserver."""
    base = os.environ.get("SITSFLOW_KUBE_DIR") or str(Path.home() / ".cache" / "sitsflow-kube")
    return Path(base) / "bin"


def missing_binaries() -> list[Path]:
    """The programs the server needs that are not built (empty when both are there)."""
    bin_dir = kube_bin_dir()
    return [p for p in (bin_dir / "etcd", bin_dir / "apiextensions-apiserver") if not os.access(p, os.X_OK)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the server gets SIGKILL when the test process dies, even if teardown never runs."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_certs(d: Path) -> None:
    """CA, the server's certificate for 127.0.0.1, a client certificate in system:masters."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=sitsflow-test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, subj, ext in (("server", "/CN=127.0.0.1", ["-extfile", str(d / "server.ext")]),
                            ("client", "/O=system:masters/CN=sitsflow-test", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj,
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(d / f"{name}.crt"), *ext)


def _kubeconfig(d: Path, url: str) -> Path:
    path = d / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": url, "certificate-authority": str(d / "ca.crt")}}],
        "users": [{"name": "admin", "user": {"client-certificate": str(d / "client.crt"),
                                             "client-key": str(d / "client.key")}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin", "namespace": "default"}}],
    }))
    return path


@dataclass
class KubeServer:
    """A running etcd + apiextensions-apiserver with Argo's CRDs installed."""

    kubeconfig: Path
    url: str
    workdir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def api_client(self):
        """A fresh ``kubernetes.client.ApiClient`` for this server."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()


def _wait(what: str, check, procs: list[subprocess.Popen], logs: list[Path], timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        for proc, log_path in zip(procs, logs):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) while waiting for {what}:\n{tail}")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; logs in {logs[-1].parent}")
        time.sleep(0.3)


def install_crds(api_client, crd_dir: Path = CRDS) -> list[str]:
    """Server-side apply every CRD in ``crd_dir`` and wait until each is Established."""
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)
    names = []
    for path in sorted(crd_dir.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        name = doc["metadata"]["name"]
        ext.patch_custom_resource_definition(
            name, doc, field_manager="sitsflow-tests", force=True,
            _content_type="application/apply-patch+yaml",
        )
        names.append(name)

    def established() -> bool:
        for name in names:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return False
        return True

    deadline = time.monotonic() + START_TIMEOUT_S
    while not established():
        if time.monotonic() > deadline:
            raise RuntimeError(f"CRDs {names} not Established after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.3)
    return names


@contextlib.contextmanager
def start_kube_server(workdir: Path) -> Iterator[KubeServer]:
    """Start etcd and the API server on free loopback ports, install Argo's CRDs; stop on exit."""
    bin_dir = kube_bin_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    _make_certs(workdir)
    client_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
    etcd_url = f"http://127.0.0.1:{client_port}"
    url = f"https://127.0.0.1:{api_port}"
    kubeconfig = _kubeconfig(workdir, url)
    server = KubeServer(kubeconfig=kubeconfig, url=url, workdir=workdir)
    logs = [workdir / "etcd.log", workdir / "apiserver.log"]
    try:
        with open(logs[0], "wb") as out:
            server.processes.append(subprocess.Popen(
                [str(bin_dir / "etcd"), "--name", "test", "--data-dir", str(workdir / "etcd"),
                 "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                 "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                 "--initial-cluster", f"test=http://127.0.0.1:{peer_port}",
                 "--unsafe-no-fsync", "--log-level", "warn"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            ))

        def etcd_ready() -> bool:
            with urllib.request.urlopen(f"{etcd_url}/health", timeout=2) as resp:
                return b'"true"' in resp.read()

        _wait("etcd", etcd_ready, server.processes, logs[:1])
        with open(logs[1], "wb") as out:
            server.processes.append(subprocess.Popen(
                [str(bin_dir / "apiextensions-apiserver"), f"--etcd-servers={etcd_url}",
                 "--bind-address=127.0.0.1", f"--secure-port={api_port}",
                 f"--tls-cert-file={workdir / 'server.crt'}", f"--tls-private-key-file={workdir / 'server.key'}",
                 f"--cert-dir={workdir / 'certs'}", f"--client-ca-file={workdir / 'ca.crt'}",
                 f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                 f"--authorization-kubeconfig={kubeconfig}", "--authentication-skip-lookup",
                 "--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionWebhook,"
                 "ValidatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            ))
        tls = ssl.create_default_context(cafile=str(workdir / "ca.crt"))
        tls.load_cert_chain(str(workdir / "client.crt"), str(workdir / "client.key"))

        def api_ready() -> bool:
            # it serves no core kinds, so the informers of those never sync: leave that check out
            with urllib.request.urlopen(f"{url}/readyz?exclude=informer-sync", context=tls, timeout=5) as resp:
                return resp.status == 200

        _wait("the API server", api_ready, server.processes, logs)
        api = server.api_client()
        install_crds(api)
        api.close()
        yield server
    finally:
        server.stop()


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the kube tests must run; .ci/run builds it)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kube_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeServer]:
    """A real Kubernetes CRD API server with Argo's CRDs, for the session (see the module doc)."""
    missing = missing_binaries()
    if missing:
        _unavailable(f"Kubernetes API server not built ({', '.join(map(str, missing))} missing): run `bash {BUILD_SCRIPT}`")
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        _unavailable("the `kubernetes` Python client is not installed")
    with start_kube_server(tmp_path_factory.mktemp("kube")) as server:
        yield server


@pytest.fixture
def kube_namespace(kube_server: KubeServer) -> str:
    """A namespace name no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"
