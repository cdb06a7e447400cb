"""``sitsflow submit`` / ``status`` / ``logs`` against a real Kubernetes API server (tests/kube.py)
with Argo's full CRDs and the project's rendered WorkflowTemplate installed, and a real S3 server
(moto). No Argo controller runs: each test plays the controller by patching the Workflow's status
through the same API. Pod lists and logs, which that server does not serve, come from
:class:`FakePodsProxy`, a small fake of just those two endpoints that forwards everything else to
the real server.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from synthetic import write_config, write_scene

from sitsflow import layout, storage, submit
from sitsflow.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "services" / "sitsflow" / "workflows" / "sitsflow.yaml"
WAIT_S = 120.0

kube_test = pytest.mark.kube


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _until(what: str, check, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Cli:
    """``sitsflow ARGS`` in a subprocess; stderr collected as it comes (for conditions on it)."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sitsflow", *args], cwd=ROOT,
                                     env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.err: list[str] = []
        self.reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for_stderr(self, text: str) -> None:
        _until(f"{text!r} on stderr; got:\n{self.stderr[-3000:]}",
               lambda: text in self.stderr or self.proc.poll() is not None)
        assert text in self.stderr, self.stderr[-3000:]

    def workflow(self, custom, ns) -> str:
        """The name of the Workflow this submit created (waits for it)."""
        names = _until(f"the Workflow; stderr so far:\n{self.stderr[-3000:]}",
                       lambda: [w["metadata"]["name"] for w in _workflows(custom, ns)] or self.proc.poll() is not None)
        assert isinstance(names, list), f"submit ended ({self.proc.returncode}) before creating it:\n{self.stderr[-3000:]}"
        return names[0]

    def finish(self) -> tuple[int, str]:
        out = self.proc.stdout.read()  # stderr belongs to the reader thread
        self.proc.wait(timeout=WAIT_S)
        self.reader.join(timeout=WAIT_S)
        return self.proc.returncode, out


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sitsflow", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def scene_uri(tmp_path_factory, s3_server) -> str:
    """The synthetic scene in S3 (``s3://<bucket>/data``), shared by the module's tests."""
    import boto3

    bucket = "sitsflow-submit-scene"
    boto3.client("s3").create_bucket(Bucket=bucket)
    folder = tmp_path_factory.mktemp("scene")
    write_scene(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.write_bytes(f"s3://{bucket}/data/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return f"s3://{bucket}/data"


@pytest.fixture
def run_config(tmp_path, scene_uri, s3_bucket) -> tuple[str, str]:
    """``(config URI in S3, output path)``: a configuration whose inputs are all in S3."""
    out = f"{s3_bucket}/out"
    cfg = write_config(tmp_path, output=out)
    text = cfg.read_text().replace("'polygons.geojson'", f"'{scene_uri}/polygons.geojson'") \
        .replace("'{tile}/", f"'{scene_uri}/{{tile}}/")
    uri = f"{s3_bucket}/configs/slovenia.cfg"
    storage.write_text(uri, text)
    return uri, out


@pytest.fixture
def kube(kube_server, kube_namespace):
    """``(CustomObjectsApi, namespace, env)`` with sitsflow's WorkflowTemplate installed there."""
    from kubernetes import client

    api = kube_server.api_client()
    custom = client.CustomObjectsApi(api)
    doc = yaml.safe_load(TEMPLATE.read_text())
    custom.patch_namespaced_custom_object("argoproj.io", "v1alpha1", kube_namespace, "workflowtemplates",
                                          doc["metadata"]["name"], doc, field_manager="tests", force=True,
                                          _content_type="application/apply-patch+yaml")
    env = {"KUBECONFIG": str(kube_server.kubeconfig), "SITSFLOW_KUBE_RETRIES": "2", "SITSFLOW_KUBE_BACKOFF": "0.01"}
    yield custom, kube_namespace, env
    api.close()


def _workflows(custom, ns) -> list[dict]:
    return custom.list_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "workflows")["items"]


def _get(custom, ns, name) -> dict:
    return custom.get_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "workflows", name)


def _patch_status(custom, ns, name, status: dict) -> None:
    """Play Argo's controller: write the Workflow's status (the CRD has no status subresource)."""
    custom.patch_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "workflows", name, {"status": status},
                                          field_validation="Strict", _content_type="application/merge-patch+json")


def _nodes(name: str, items: dict[str, list[str]], results: dict[str, str] | None = None,
           messages: dict[str, str] | None = None) -> dict[str, dict]:
    """Argo's node tree for ``{task: [phase of each item]}``: a DAG root; per task a Retry node
    (one item) or a TaskGroup of Retry nodes (fan-out); under each Retry node its Pod attempt."""
    nodes: dict[str, dict] = {name: {"id": name, "name": name, "displayName": name, "type": "DAG",
                                     "templateName": "pipeline", "phase": "Running", "children": []}}
    results, messages = results or {}, messages or {}
    serial = 0
    for task, phases in items.items():
        parent = name
        if len(phases) > 1:
            serial += 1
            group = f"{name}-{serial}"
            nodes[group] = {"id": group, "name": f"{name}.{task}", "displayName": task, "type": "TaskGroup",
                            "templateName": task, "phase": "Running", "boundaryID": name, "children": []}
            nodes[name]["children"].append(group)
            parent = group
        for k, phase in enumerate(phases):
            label = task if len(phases) == 1 else f"{task}({k}:{k})"
            serial += 1
            retry, pod = f"{name}-{serial}", f"{name}-{serial}0"
            common = {"templateName": task, "phase": phase, "boundaryID": name,
                      "startedAt": f"2026-11-30T10:{serial:02d}:00Z"}
            if phase in ("Succeeded", "Failed", "Error"):
                common["finishedAt"] = f"2026-11-30T10:{serial:02d}:30Z"
            nodes[retry] = {"id": retry, "name": f"{name}.{label}", "displayName": label, "type": "Retry",
                            "children": [pod], **common}
            nodes[pod] = {"id": pod, "name": f"{name}.{label}(0)", "displayName": f"{label}(0)", "type": "Pod",
                          **common}
            if label in messages:
                nodes[retry]["message"] = nodes[pod]["message"] = messages[label]
            if label in results:
                nodes[pod]["outputs"] = {"result": results[label]}
            nodes[parent]["children"].append(retry)
    return nodes


FULL_RUN = {"prepare": ["Succeeded"], "sample": ["Succeeded"], "plan-training": ["Succeeded"],
            "train": ["Succeeded", "Succeeded"], "merge": ["Succeeded"]}


class FakePodsProxy:
    """A FAKE of the two core endpoints the CRD server lacks -- the pod list
    (``GET /api/v1/namespaces/NS/pods?labelSelector=...``) and ``pods/NAME/log`` -- in front of
    the real API server, to which it forwards every other request (plain HTTP on 127.0.0.1)."""

    def __init__(self, kube_server) -> None:
        self.pods: dict[tuple[str, str], dict] = {}
        self.log_requests: list[dict] = []
        ctx = ssl.create_default_context(cafile=str(kube_server.workdir / "ca.crt"))
        ctx.load_cert_chain(str(kube_server.workdir / "client.crt"), str(kube_server.workdir / "client.key"))
        upstream, fake = kube_server.url, self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes | None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
                    data = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _forward(self) -> None:
                body = self._body()
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
                if body is not None and not any(k.lower() == "content-type" for k in headers):
                    headers["Content-Type"] = "application/json"  # what the API server assumes; urllib would say form data
                req = urllib.request.Request(upstream + self.path, data=body, method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
                        self._send(resp.status, resp.read(), resp.headers.get("Content-Type", "application/json"))
                except urllib.error.HTTPError as err:
                    self._send(err.code, err.read(), err.headers.get("Content-Type", "application/json"))

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                query = parse_qs(url.query)
                if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 5 and parts[4] == "pods":
                    ns = parts[3]
                    if len(parts) == 5:
                        selector = query.get("labelSelector", [""])[0]
                        key, _, value = selector.partition("=")
                        items = [{"metadata": {"name": n, "namespace": ns, "labels": p["labels"],
                                               "annotations": p["annotations"]}}
                                 for (pns, n), p in fake.pods.items() if pns == ns and p["labels"].get(key) == value]
                        self._send(200, json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                                    "items": items}).encode(), "application/json")
                        return
                    if len(parts) == 7 and parts[6] == "log" and (ns, parts[5]) in fake.pods:
                        fake.log_requests.append({"pod": parts[5], **{k: v[0] for k, v in query.items()}})
                        lines = fake.pods[(ns, parts[5])]["log"].splitlines(keepends=True)
                        tail = int(query.get("tailLines", ["0"])[0] or 0)
                        self._send(200, "".join(lines[-tail:] if tail else lines).encode(), "text/plain")
                        return
                    self._send(404, json.dumps({"kind": "Status", "code": 404, "message": "not found"}).encode(),
                               "application/json")
                    return
                self._forward()

            do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_pod(self, ns: str, name: str, workflow: str, node_id: str, log: str) -> None:
        self.pods[(ns, name)] = {"labels": {submit.ARGO_WORKFLOW_LABEL: workflow},
                                 "annotations": {submit.ARGO_NODE_ID: node_id}, "log": log}

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig-fake-pods"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}]}))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_pods(kube_server):
    proxy = FakePodsProxy(kube_server)
    yield proxy
    proxy.close()


# --------------------------------------------------------------------------------------------
# tests without a cluster
# --------------------------------------------------------------------------------------------
def test_compressed_and_offloaded_nodes_are_read_honestly():
    nodes = _nodes("wf", {"prepare": ["Succeeded"], "train": ["Succeeded", "Running", "Failed"]})
    packed = base64.b64encode(gzip.compress(json.dumps(nodes).encode())).decode()
    wf = {"metadata": {"name": "wf"}, "status": {"phase": "Running", "compressedNodes": packed}}
    snap = submit.snapshot(wf)
    assert snap.stages()["train"] == {"total": 3, "done": 1, "running": 1, "failed": 1}
    assert submit.stage_lines(snap) == ["prepare: 1/1 done", "train: 1/3 done, 1 running, 1 failed"]
    offloaded = submit.snapshot({"metadata": {"name": "wf"},
                                 "status": {"phase": "Running", "offloadNodeStatusVersion": "fnv:123"}})
    assert not offloaded.nodes_known and "offloaded" in submit.stage_lines(offloaded)[0]


def test_stages_follow_the_stored_template_dag_order():
    # Argo stores the template the run started from: stages not started yet are listed, in DAG order
    from sitsflow.runner.workflow import default_workflow_path, entry_dag

    template = yaml.safe_load(default_workflow_path().read_text())
    dag_order = [t["name"] for t in entry_dag(template)[0]]
    nodes = _nodes("wf", {"prepare": ["Succeeded"]})
    wf = {"metadata": {"name": "wf"},
          "status": {"phase": "Running", "nodes": nodes, "storedWorkflowTemplateSpec": template["spec"]}}
    snap = submit.snapshot(wf)
    assert snap.order == dag_order and list(snap.stages())[:2] == dag_order[:2]
    assert snap.stages()["prepare"]["done"] == 1


def test_local_inputs_and_local_output_are_refused_before_any_cluster_call(tmp_path):
    write_scene(tmp_path)
    cfg = write_config(tmp_path, output="s3://bucket/out")
    env = {"KUBECONFIG": str(tmp_path / "none")}
    proc = _run("submit", str(cfg), env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "chain.ground_truth" in proc.stderr and "the cluster cannot read files of this machine" in proc.stderr
    assert f"dated_raster.path = '{tmp_path}/{{tile}}/series.tif'" in proc.stderr  # a template path too
    proc = _run("submit", str(cfg), "--set", f"chain.output_path={tmp_path / 'out'}", env=env)
    assert proc.returncode == 2 and "chain.output_path" in proc.stderr and "s3://" in proc.stderr


@pytest.mark.parametrize(
    ("setting", "culprit"),
    [
        ("dl_parameters={'hidden_layer': [8]}", "dl_parameters.hidden_layer: network MLPClassifier has no parameter"),
        ("dl_module=missing_net.py", "missing_net.py"),
        ("dl_name=NoSuchNet", "class 'NoSuchNet' not found in"),
    ],
    ids=["bad dl_parameters key", "missing dl_module", "unknown class"],
)
def test_network_mistakes_exit_2_in_submit_before_anything_else(tmp_path, setting, culprit):
    write_scene(tmp_path)
    cfg = write_config(tmp_path, output="s3://bucket/out")  # local inputs: refused, but only after these checks
    sets = ["--set", f"arg_train.deep_learning_parameters.{setting}"]
    if setting.startswith("dl_name"):  # a dl_module without that class
        (tmp_path / "net.py").write_text("from sitsflow.nn import MLPClassifier\n")
        sets += ["--set", f"arg_train.deep_learning_parameters.dl_module={tmp_path / 'net.py'}"]
    proc = _run("submit", str(cfg), *sets, env={"KUBECONFIG": str(tmp_path / "none")})
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert culprit in proc.stderr and "the cluster cannot read files" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.s3
def test_unreachable_cluster_exits_75_after_retries(tmp_path, run_config):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {}}], "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    proc = _run("submit", run_config[0], "--wait",
                env={"KUBECONFIG": str(kubeconfig), "SITSFLOW_KUBE_RETRIES": "3", "SITSFLOW_KUBE_BACKOFF": "0.01"})
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "failed 3 time(s)" in proc.stderr and proc.stdout == ""


# --------------------------------------------------------------------------------------------
# against the real API server
# --------------------------------------------------------------------------------------------
@kube_test
def test_bad_configuration_exits_2_and_creates_nothing(kube, run_config):
    custom, ns, env = kube
    proc = _run("submit", run_config[0], "-n", ns, "--set", "arg_train.runs=0", "--wait", env=env)
    assert proc.returncode == 2 and "arg_train.runs" in proc.stderr
    assert _workflows(custom, ns) == []


@kube_test
def test_missing_template_and_queue_without_pool_label_exit_2(kube, run_config):
    custom, ns, env = kube
    proc = _run("submit", run_config[0], "-n", ns, "--template", "nope", env=env)
    assert proc.returncode == 2 and "WorkflowTemplate 'nope' not found" in proc.stderr
    proc = _run("submit", run_config[0], "-n", ns, "--set", "resources.train.queue=gpu", env=env)
    assert proc.returncode == 2 and "queue" in proc.stderr, proc.stderr[-2000:]
    assert _workflows(custom, ns) == []


@kube_test
def test_submit_creates_the_workflow_once_and_attaches_the_second_time(kube, run_config):
    custom, ns, env = kube
    uri, out = run_config
    first = _run("submit", uri, "-n", ns, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    doc = json.loads(first.stdout)
    assert doc["created"] is True and doc["workflow"].startswith("sitsflow-slovenia-")
    wf = _get(custom, ns, doc["workflow"])
    assert wf["spec"]["workflowTemplateRef"] == {"name": "sitsflow"}
    params = {p["name"]: p["value"] for p in wf["spec"]["arguments"]["parameters"]}
    assert params["overrides"] == "[]" and params["config"] == doc["config"]
    assert params["config"].startswith(f"{out}/config/submitted-")
    uploaded = load_config(params["config"])  # the resolved configuration, inputs in S3
    assert uploaded.chain.output_path == out and uploaded == load_config(uri)
    assert uploaded.chain.ground_truth.startswith("s3://") and uploaded.chain.ground_truth.endswith("/polygons.geojson")
    second = _run("submit", uri, "-n", ns, env=env)
    assert second.returncode == 0 and json.loads(second.stdout)["created"] is False
    assert json.loads(second.stdout)["workflow"] == doc["workflow"]
    assert "attaching to Workflow" in second.stderr
    assert len(_workflows(custom, ns)) == 1
    # a different configuration is another run
    third = _run("submit", uri, "-n", ns, "--set", "arg_train.runs=2", env=env)
    assert third.returncode == 0 and json.loads(third.stdout)["workflow"] != doc["workflow"]
    # after a failed attempt the same configuration starts attempt 2
    _patch_status(custom, ns, doc["workflow"], {"phase": "Failed", "message": "a step failed"})
    fourth = _run("submit", uri, "-n", ns, env=env)
    assert json.loads(fourth.stdout)["workflow"] == doc["workflow"] + "-2"
    assert len(_workflows(custom, ns)) == 3


@kube_test
def test_submit_wait_follows_the_stages_and_exits_0_with_results(kube, run_config):
    custom, ns, env = kube
    uri, out = run_config
    cli = Cli("submit", uri, "-n", ns, "--wait", "--interval", "0.1", env=env)
    name = cli.workflow(custom, ns)
    _patch_status(custom, ns, name, {"phase": "Running", "startedAt": "2026-11-30T10:00:00Z", "nodes": _nodes(
        name, {"prepare": ["Succeeded"], "sample": ["Succeeded"], "plan-training": ["Succeeded"],
               "train": ["Succeeded", "Running"]})})
    cli.wait_for_stderr("train: 1/2 done, 1 running")
    storage.write_text(layout.final_results(out), "Kappa : 0.93\nOverall accuracy : 0.95\n")
    storage.write_bytes(layout.final_classif(out, 0), b"tif")
    results = {"sample": '{"skipped": false}', "train(0:0)": '{"skipped": true}', "train(1:1)": '{"skipped": false}'}
    _patch_status(custom, ns, name, {"phase": "Succeeded", "nodes": _nodes(name, FULL_RUN, results)})
    code, stdout = cli.finish()
    assert code == 0, cli.stderr[-3000:]
    line = json.loads(stdout.strip().splitlines()[-1])
    assert line["workflow"] == name and line["phase"] == "Succeeded" and line["namespace"] == ns
    assert line["results"] == layout.final_results(out) and line["output_path"] == out
    assert line["tasks"] == {"prepare": 1, "sample": 1, "plan-training": 1, "train": 2, "merge": 1}
    assert (line["stage_tasks_done"], line["stage_tasks_skipped"]) == (2, 1)
    assert "Kappa : 0.93" in cli.stderr and f"output: {layout.final_classif(out, 0)}" in cli.stderr
    # `status` gives the same view without submitting
    proc = _run("status", name, "-n", ns, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["tasks"] == line["tasks"]
    assert "train: 2/2 done" in proc.stderr


@kube_test
def test_failed_workflow_exits_1_with_messages_and_pod_log_tails(kube, run_config, fake_pods, tmp_path):
    custom, ns, env = kube
    uri, _ = run_config
    env = {**env, "KUBECONFIG": str(fake_pods.kubeconfig(tmp_path))}
    cli = Cli("submit", uri, "-n", ns, "--wait", "--interval", "0.1", "--no-progress", env=env)
    name = cli.workflow(custom, ns)
    message = "Error (exit code 2)"
    nodes = _nodes(name, {"prepare": ["Succeeded"], "train": ["Succeeded", "Failed"]},
                   messages={"train(1:1)": message})
    failed_pod_node = nodes[next(k for k, n in nodes.items() if n["displayName"] == "train(1:1)")]["children"][0]
    log_text = "".join(f"line {i}\n" for i in range(100)) + "sitsflow train --region 1 --seed 0 --hyp 1 failed (exit 2)\n"
    fake_pods.add_pod(ns, f"{name}-train-123", name, failed_pod_node, log_text)
    fake_pods.add_pod(ns, "other-pod", "another-workflow", failed_pod_node, "not this one\n")
    _patch_status(custom, ns, name, {"phase": "Failed", "message": "child failed", "nodes": nodes})
    code, stdout = cli.finish()
    assert code == 1, cli.stderr[-3000:]
    assert stdout == ""
    assert f"train(1:1) failed: {message}" in cli.stderr
    assert "failed (exit 2)" in cli.stderr and "line 99" in cli.stderr and "line 10\n" not in cli.stderr
    assert "not this one" not in cli.stderr
    assert fake_pods.log_requests == [{"pod": f"{name}-train-123", "container": "main",
                                       "tailLines": str(submit.LOG_TAIL_LINES)}]
    # `logs --stage` shows the pods of one stage only
    proc = _run("logs", name, "-n", ns, "--stage", "train", "--tail", "2", env=env)
    assert proc.returncode == 0 and "line 99\nsitsflow train" in proc.stderr and "line 98" not in proc.stderr
    proc = _run("logs", name, "-n", ns, "--stage", "nope", env=env)
    assert proc.returncode == 2 and "--stage 'nope'" in proc.stderr


@kube_test
def test_workflow_refused_by_the_controller_exits_2(kube, run_config):
    custom, ns, env = kube
    cli = Cli("submit", run_config[0], "-n", ns, "--wait", "--interval", "0.1", env=env)
    name = cli.workflow(custom, ns)
    _patch_status(custom, ns, name, {"phase": "Error",
                                     "message": "invalid spec: spec.arguments.config.value is required"})
    code, stdout = cli.finish()
    assert code == 2 and "refused before any step ran" in cli.stderr and "config.value is required" in cli.stderr


@kube_test
def test_sigterm_stops_the_workflow_and_timeout_exits_75(kube, run_config):
    custom, ns, env = kube
    cli = Cli("submit", run_config[0], "-n", ns, "--wait", "--interval", "0.1", "--no-progress", env=env)
    name = cli.workflow(custom, ns)
    _patch_status(custom, ns, name, {"phase": "Running", "nodes": _nodes(name, {"prepare": ["Running"]})})
    cli.wait_for_stderr("prepare: 0/1 done, 1 running")
    assert "shutdown" not in _get(custom, ns, name)["spec"]
    cli.proc.send_signal(signal.SIGTERM)
    code, stdout = cli.finish()
    assert code == 128 + signal.SIGTERM and stdout == ""
    assert _get(custom, ns, name)["spec"]["shutdown"] == "Stop"
    assert "stopping Workflow" in cli.stderr
    # attaching again with a deadline: exit 75, the run is left alone
    _patch_status(custom, ns, name, {"phase": "Running"})
    custom.patch_namespaced_custom_object("argoproj.io", "v1alpha1", ns, "workflows", name,
                                          {"spec": {"shutdown": None}},
                                          _content_type="application/merge-patch+json")
    proc = _run("submit", run_config[0], "-n", ns, "--wait", "--interval", "0.1", "--timeout", "0.5", env=env)
    assert proc.returncode == 75 and "--timeout" in proc.stderr
    assert "shutdown" not in _get(custom, ns, name)["spec"]


# --------------------------------------------------------------------------------------------
# the submitter's RBAC in the chart
# --------------------------------------------------------------------------------------------
def test_chart_submitter_role_grants_what_submit_uses():
    import helm_python
    import kubernetes_validate

    chart = helm_python.Chart.load(str(ROOT / "charts" / "sitsflow"))

    def docs(values):
        rendered = chart.render(values, name="demo", namespace="runs")
        return [d for path, text in rendered.items() if path.endswith("rbac-submitter.yaml")
                for d in yaml.safe_load_all(text) if d]

    assert docs({}) == []  # off by default
    subjects = [{"kind": "Group", "name": "ci-runners", "apiGroup": "rbac.authorization.k8s.io"}]
    role_only = docs({"submitter": {"create": True}})
    assert [d["kind"] for d in role_only] == ["Role"]
    role, binding = docs({"submitter": {"create": True, "subjects": subjects}})
    for doc in (role, binding):
        kubernetes_validate.validate(doc, "1.33", strict=True)
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {("argoproj.io", "workflows"): {"create", "get", "list", "watch", "patch"},
                     ("argoproj.io", "workflowtemplates"): {"get"},
                     ("", "pods"): {"list"}, ("", "pods/log"): {"get"}}
    assert binding["subjects"] == subjects and binding["roleRef"]["name"] == role["metadata"]["name"]
    with pytest.raises(helm_python.HelmValuesError, match="/submitter/subjects/0/kind"):
        chart.validate_schema({"submitter": {"subjects": [{"kind": "Robot", "name": "x"}]}})
