"""``sitsflow submit``, ``status`` and ``logs``: production runs through the Kubernetes API.

A run on a cluster is an Argo ``Workflow`` custom object that references the installed
``WorkflowTemplate`` (``spec.workflowTemplateRef``): creating one needs only the kubeconfig (or the
in-cluster service account) and RBAC that ``kubectl`` uses, no Argo Server and no argo binary.

``submit`` checks the configuration here first (the same checks as ``prepare``), uploads the
resolved configuration next to the run's outputs, and creates the Workflow under a name derived
from the configuration's fingerprint: submitting the same run again attaches to it instead of
starting a duplicate (a new attempt is created only after a failed one). ``--wait`` follows the
Workflow's ``status.nodes`` (or ``status.compressedNodes``), reports each stage's items, prints
failed items' messages and the tail of their pods' logs, and on success RESULTS.txt.

Exit codes (``sitsflow.errors``): 0 succeeded (or submitted, without ``--wait``); 1 the workflow
failed; 2 configuration, template or request refused; 75 cluster unreachable after retries, or
``--timeout`` reached while the run goes on. SIGINT/SIGTERM during ``--wait`` stop the Workflow
(``spec.shutdown: Stop``) before exiting 130/143.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar, cast

from sitsflow import layout, storage
from sitsflow.errors import BadInputError, ConfigError, SitsflowError, TransientError
from sitsflow.log import get_logger
from sitsflow.shards import count_tasks

log = get_logger(__name__)
T = TypeVar("T")

GROUP, VERSION, WORKFLOWS, TEMPLATES = "argoproj.io", "v1alpha1", "workflows", "workflowtemplates"
LABEL_FINGERPRINT = "sitsflow.io/fingerprint"
"""Label of a submitted Workflow: the first 40 hex digits of its configuration's sha256."""
LABEL_ATTEMPT = "sitsflow.io/attempt"
ANNOTATION_OUTPUT = "sitsflow.io/output-path"
ARGO_WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
ARGO_TEMPLATE_LABEL = "workflows.argoproj.io/workflow-template"
ARGO_NODE_ID = "workflows.argoproj.io/node-id"
SHUTDOWN = "Stop"
"""What a cancelled ``--wait`` sets in ``spec.shutdown``. Argo terminates the running pods and
schedules none for both ``Stop`` and ``Terminate``; ``Stop`` still runs exit handlers."""
FINISHED = ("Succeeded", "Failed", "Error")
MAX_DELAY_S = 30.0
DEFAULT_RETRIES, DEFAULT_BACKOFF_S = 6, 1.0
TRANSIENT_STATUS = {0, 408, 429, 500, 502, 503, 504}
LOG_TAIL_LINES = 40


class Interrupted(SitsflowError):
    """SIGINT or SIGTERM while waiting (exit 128 + signal number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


class WorkflowFailed(SitsflowError):
    """The Workflow ended Failed or Error (exit 1)."""


# --------------------------------------------------------------------------------------------
# The cluster: one place for API calls, their retries and how their errors map to exit codes
# --------------------------------------------------------------------------------------------
def _retry_settings() -> tuple[int, float]:
    """``(attempts, base_delay_s)`` from ``SITSFLOW_KUBE_RETRIES`` / ``SITSFLOW_KUBE_BACKOFF``."""
    out = []
    for name, default, kind, minimum in (
        ("SITSFLOW_KUBE_RETRIES", DEFAULT_RETRIES, int, 1),
        ("SITSFLOW_KUBE_BACKOFF", DEFAULT_BACKOFF_S, float, 0),
    ):
        raw = os.environ.get(name, "").strip()
        try:
            value = kind(raw) if raw else default
        except ValueError:
            value = minimum - 1
        if not minimum <= value < float("inf"):
            raise ConfigError(f"{name}={raw!r}: expected a {kind.__name__} >= {minimum}")
        out.append(value)
    return int(out[0]), float(out[1])


def _api_error(exc: Exception) -> tuple[int, str] | None:
    """``(http_status, message)`` of a kubernetes ApiException (status 0: no response)."""
    from kubernetes.client.exceptions import ApiException

    if not isinstance(exc, ApiException):
        return None
    message = exc.reason or ""
    try:
        message = json.loads(exc.body or "{}").get("message") or message
    except (TypeError, ValueError, AttributeError):
        pass
    return int(exc.status or 0), str(message)


def _is_transient(exc: Exception) -> bool:
    from urllib3.exceptions import HTTPError as Urllib3Error

    info = _api_error(exc)
    if info is not None:
        return info[0] in TRANSIENT_STATUS
    return isinstance(exc, (Urllib3Error, ConnectionError, TimeoutError))


class Cluster:
    """The Kubernetes API of one namespace, with retries (``SITSFLOW_KUBE_RETRIES`` attempts)."""

    def __init__(self, namespace: str | None = None, context: str | None = None) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
                config.load_incluster_config(client_configuration=cfg)
                default_ns = _incluster_namespace()
            else:
                config.load_kube_config(context=context, client_configuration=cfg)
                contexts, active = config.list_kube_config_contexts()
                chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
                default_ns = (chosen or {}).get("context", {}).get("namespace")
        except (config.ConfigException, OSError, TypeError, ValueError) as exc:
            raise BadInputError(f"no usable cluster credentials (kubeconfig or in-cluster): {exc}") from None
        self.api = client.ApiClient(cfg)
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.namespace = namespace or default_ns or "default"
        self.server = cfg.host

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retrying transient failures; ApiExceptions 4xx pass through."""
        attempts, base = _retry_settings()
        kwargs.setdefault("_request_timeout", 30)
        for attempt in range(1, attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified here
                if not _is_transient(exc):
                    raise
                if attempt >= attempts:
                    raise TransientError(
                        f"{what}: the cluster's API ({self.server}) failed {attempts} time(s), last: {_short(exc)}"
                    ) from exc
                delay = min(MAX_DELAY_S, base * 2 ** (attempt - 1))
                log.warning("%s: %s; attempt %d/%d, retrying in %.1f s", what, _short(exc), attempt, attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def refused(self, what: str, exc: Exception) -> SitsflowError:
        """The exit-2 error for a request the API refused (RBAC, validation, not found)."""
        info = _api_error(exc)
        if info is None:
            raise exc
        status, message = info
        hint = {
            401: "the credentials were not accepted",
            403: "permission denied (the chart's submitter Role, value submitter.create, grants what sitsflow needs)",
            404: "not found",
            422: "refused by the API server's validation",
        }.get(status, f"HTTP {status}")
        return BadInputError(f"{what} in namespace {self.namespace!r}: {hint}: {message}")

    # the objects -------------------------------------------------------------------------------
    def get_template(self, name: str) -> dict:
        try:
            # the custom objects API returns the JSON object (a dict), typed `object`
            return cast(
                dict,
                self.call(
                    f"reading WorkflowTemplate {name}",
                    self.custom.get_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    TEMPLATES,
                    name,
                ),
            )
        except Exception as exc:
            if (info := _api_error(exc)) is not None and info[0] == 404:
                raise BadInputError(
                    f"WorkflowTemplate {name!r} not found in namespace {self.namespace!r}: install the chart "
                    "(helm install sitsflow charts/sitsflow) or name it with --template"
                ) from None
            raise self.refused(f"reading WorkflowTemplate {name!r}", exc) from None

    def get_workflow(self, name: str) -> dict | None:
        try:
            return cast(
                dict,
                self.call(
                    f"reading Workflow {name}",
                    self.custom.get_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    WORKFLOWS,
                    name,
                ),
            )
        except Exception as exc:
            if (info := _api_error(exc)) is not None and info[0] == 404:
                return None
            raise self.refused(f"reading Workflow {name!r}", exc) from None

    def list_workflows(self, selector: str) -> list[dict]:
        try:
            listed = cast(
                dict,
                self.call(
                    "listing Workflows",
                    self.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    WORKFLOWS,
                    label_selector=selector,
                ),
            )
            return listed.get("items", [])
        except Exception as exc:
            raise self.refused("listing Workflows", exc) from None

    def create_workflow(self, body: dict) -> dict | None:
        """The created Workflow, or None when one of that name exists already (409)."""
        try:
            return cast(
                dict,
                self.call(
                    f"creating Workflow {body['metadata']['name']}",
                    self.custom.create_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    WORKFLOWS,
                    body,
                ),
            )
        except Exception as exc:
            if (info := _api_error(exc)) is not None and info[0] == 409:
                return None
            raise self.refused(f"creating Workflow {body['metadata']['name']!r}", exc) from None

    def stop_workflow(self, name: str, strategy: str = SHUTDOWN) -> None:
        try:
            self.call(
                f"stopping Workflow {name}",
                self.custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                WORKFLOWS,
                name,
                {"spec": {"shutdown": strategy}},
                _content_type="application/merge-patch+json",
            )
        except SitsflowError:
            raise
        except Exception as exc:
            raise self.refused(f"stopping Workflow {name!r}", exc) from None

    def pods_by_node(self, workflow: str) -> dict[str, str]:
        """``{node id: pod name}`` of the Workflow's pods that still exist."""
        try:
            pods = self.call(
                f"listing the pods of {workflow}",
                self.core.list_namespaced_pod,
                self.namespace,
                label_selector=f"{ARGO_WORKFLOW_LABEL}={workflow}",
            )
        except Exception as exc:
            raise self.refused(f"listing the pods of Workflow {workflow!r}", exc) from None
        found = {}
        for pod in pods.items:
            meta = pod.metadata
            if meta is None or meta.name is None:  # never so for a pod read from the API server
                continue
            annotations = meta.annotations or {}
            # before Argo 3.2 the pod name was the node id (no annotation)
            found[annotations.get(ARGO_NODE_ID, meta.name)] = meta.name
        return found

    def pod_log(self, pod: str, tail_lines: int | None = LOG_TAIL_LINES) -> str:
        try:
            return self.call(
                f"reading the log of pod {pod}",
                self.core.read_namespaced_pod_log,
                pod,
                self.namespace,
                container="main",
                tail_lines=tail_lines,
            )
        except Exception as exc:
            raise self.refused(f"reading the log of pod {pod!r}", exc) from None


def _incluster_namespace() -> str | None:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _short(exc: BaseException) -> str:
    info = _api_error(exc) if isinstance(exc, Exception) else None
    if info is not None:
        return f"HTTP {info[0]} {info[1]}".strip()
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"


# --------------------------------------------------------------------------------------------
# The run: configuration, fingerprint, name, the Workflow object
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """What ``submit`` sends: the resolved configuration, where it goes, and the Workflow's name."""

    text: str
    output_path: str
    fingerprint: str
    base_name: str
    resources: Any = None
    """The configuration's resource blocks, checked against the template's node settings."""

    @property
    def config_uri(self) -> str:
        return layout.join(self.output_path, "config", f"submitted-{self.fingerprint[:12]}.cfg")


def _dns_label(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def _local_inputs(section: str, value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """``(key path, value)`` of each absolute local path: relative paths were resolved against the
    configuration's folder, so every input not in object storage is one (``{tile}`` templates too)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _local_inputs(section, v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _local_inputs(section, v, f"{key}[{i}]")
    elif isinstance(value, str) and os.path.isabs(value):
        yield f"{section}{'' if key.startswith('[') else '.'}{key}", value  # stac[1].catalog for a list


def prepare_run(source: str, overrides: Sequence[str], name: str | None = None) -> Run:
    """Check the configuration as ``prepare`` does, before anything reaches the cluster.

    Raises :class:`ConfigError` (exit 2) for every problem ``prepare`` would report, and when the
    run could not work on a cluster: an output path or an input that is not in object storage.
    """
    from sitsflow import preflight
    from sitsflow.config import SECTION_MODELS, load_config

    cfg = load_config(source, list(overrides))
    preflight.run(cfg)  # prepare's checks: class files, dl_module, dl_parameters, the network built
    out = cfg.chain.output_path
    if not storage.is_s3(out):
        raise ConfigError(
            f"chain.output_path = {out!r}: a cluster run writes to object storage; "
            "expected an s3://bucket/prefix URI (e.g. --set chain.output_path=s3://bucket/runs/x)"
        )
    local = [item for sec in SECTION_MODELS for item in _local_inputs(sec, cfg.section_dict(sec))]
    if local:
        listing = "; ".join(f"{key} = {value!r}" for key, value in local)
        raise ConfigError(f"the cluster cannot read files of this machine: {listing}; upload them and give s3:// URIs")
    text = cfg.to_cfg()
    body = text.split("\n", 1)[1]  # the first line names where it was read from
    fingerprint = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if name:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?", name):
            raise ConfigError(
                f"--name {name!r}: expected a lower-case DNS label of 1 to 52 characters "
                "(letters, digits, '-'; Argo adds suffixes to pod names)"
            )
        base = name
    else:
        stem = _dns_label(os.path.splitext(os.path.basename(source.rstrip("/")))[0])[:30].strip("-")
        base = "-".join(p for p in ("sitsflow", stem, fingerprint[:10]) if p)
    return Run(text=text, output_path=out, fingerprint=fingerprint, base_name=base, resources=cfg.resources)


def workflow_body(run: Run, name: str, attempt: int, template: str) -> dict:
    """The Workflow object: the WorkflowTemplate with the uploaded configuration."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Workflow",
        "metadata": {
            "name": name,
            "labels": {
                LABEL_FINGERPRINT: run.fingerprint[:40],
                LABEL_ATTEMPT: str(attempt),
                ARGO_TEMPLATE_LABEL: template,
            },
            "annotations": {ANNOTATION_OUTPUT: run.output_path},
        },
        "spec": {
            "workflowTemplateRef": {"name": template},
            "arguments": {
                "parameters": [
                    {"name": "config", "value": run.config_uri},
                    {"name": "overrides", "value": "[]"},
                    # the run's mutex is keyed on it (one run per output path)
                    {"name": "output-path", "value": run.output_path},
                ]
            },
        },
    }


def check_resources(run: Run, template: dict) -> None:
    """``prepare``'s check of the resource blocks, with the template's node settings (pool label,
    selectors): a ``queue`` without the chart's ``poolLabel`` is refused here, not in the cluster."""
    from sitsflow.config.resources import stage_pods

    if run.resources is None:
        return
    defaults = {
        p.get("name"): str(p.get("value", ""))
        for p in template.get("spec", {}).get("arguments", {}).get("parameters", [])
    }
    try:
        stage_pods(
            run.resources,
            pool_label=defaults.get("pool-label", ""),
            gpu_node_selector=defaults.get("gpu-node-selector") or "{}",
            cpu_node_selector=defaults.get("cpu-node-selector") or "{}",
        )
    except ValueError as exc:
        raise ConfigError(f"{exc} (WorkflowTemplate {template['metadata']['name']!r})") from None


def _attempt_name(base: str, attempt: int) -> str:
    return base if attempt == 1 else f"{base}-{attempt}"


def _attempt(wf: dict) -> int:
    try:
        return int(wf["metadata"].get("labels", {}).get(LABEL_ATTEMPT, "1"))
    except ValueError:
        return 1


def submit_run(cluster: Cluster, run: Run, template: str) -> tuple[dict, bool]:
    """Create the Workflow of ``run``, or find the one already running it.

    Returns ``(workflow, created)``. The same configuration (fingerprint) attaches to its latest
    attempt unless that attempt failed; then attempt ``n + 1`` (``<name>-<n+1>``) is created.
    """
    tmpl = cluster.get_template(template)
    params = {p.get("name") for p in tmpl.get("spec", {}).get("arguments", {}).get("parameters", [])}
    missing = {"config", "overrides", "output-path"} - params
    if missing:
        raise BadInputError(
            f"WorkflowTemplate {template!r} has no parameter {', '.join(sorted(missing))}: "
            "it is not sitsflow's (charts/sitsflow installs it)"
        )
    check_resources(run, tmpl)
    while True:
        attempts = [
            wf
            for wf in cluster.list_workflows(f"{LABEL_FINGERPRINT}={run.fingerprint[:40]}")
            if wf["metadata"]["name"] == run.base_name or wf["metadata"]["name"].startswith(run.base_name + "-")
        ]
        latest = max(attempts, key=_attempt, default=None)
        if latest is not None and _phase(latest) not in ("Failed", "Error"):
            log.info(
                "attaching to Workflow %s (%s): it runs the same configuration",
                latest["metadata"]["name"],
                _phase(latest) or "Pending",
            )
            return latest, False
        attempt = _attempt(latest) + 1 if latest is not None else 1
        name = _attempt_name(run.base_name, attempt)
        if attempt == 1 or not storage.exists(run.config_uri) or storage.read_text(run.config_uri) != run.text:
            storage.write_text(run.config_uri, run.text)
        created = cluster.create_workflow(workflow_body(run, name, attempt, template))
        if created is not None:
            log.info("created Workflow %s in namespace %s (configuration %s)", name, cluster.namespace, run.config_uri)
            return created, True
        existing = cluster.get_workflow(name)
        if existing is None:
            continue  # deleted in between: look again
        labels = existing["metadata"].get("labels", {})
        if labels.get(LABEL_FINGERPRINT) != run.fingerprint[:40]:
            raise BadInputError(
                f"Workflow {name!r} exists in namespace {cluster.namespace!r} and runs another "
                "configuration; choose another --name"
            )
        # another submitter created it a moment ago: loop to attach to it


# --------------------------------------------------------------------------------------------
# Reading a Workflow's status
# --------------------------------------------------------------------------------------------
def _phase(wf: dict) -> str:
    return str((wf.get("status") or {}).get("phase") or "")


def workflow_nodes(wf: dict) -> dict[str, dict] | None:
    """``status.nodes``, decompressed from ``status.compressedNodes`` (base64 of gzip JSON) when
    Argo compressed them; None when they are offloaded to Argo's database (readable only through
    the Argo Server) or compressed with an algorithm other than gzip."""
    status = wf.get("status") or {}
    if status.get("nodes"):
        return status["nodes"]
    packed = status.get("compressedNodes")
    if packed:
        raw = base64.b64decode(packed)
        if raw[:2] == b"\x1f\x8b":
            return json.loads(gzip.decompress(raw))
        log.warning(
            "Workflow %s: status.compressedNodes is not gzip (ARGO_COMPRESSION_ALGORITHM zstd or "
            "brotli?); per-stage progress is not available",
            wf["metadata"]["name"],
        )
        return None
    if status.get("offloadNodeStatusVersion"):
        return None
    return {}


@dataclass
class Item:
    """One task item (a fan-out element, or a task without fan-out) and its last pod attempt."""

    task: str
    label: str
    phase: str
    message: str
    pod_node: str | None
    started: str | None
    finished: str | None
    result: str | None


@dataclass
class Snapshot:
    """What a Workflow's status says, in sitsflow's terms."""

    name: str
    phase: str
    message: str
    nodes_known: bool
    items: list[Item] = field(default_factory=list)
    skipped_tasks: dict[str, str] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def stages(self) -> dict[str, dict[str, int]]:
        """``{task: {"total", "done", "running", "failed"}}`` in DAG order."""
        out: dict[str, dict[str, int]] = {t: {"total": 0, "done": 0, "running": 0, "failed": 0} for t in self.order}
        for item in self.items:
            row = out.setdefault(item.task, {"total": 0, "done": 0, "running": 0, "failed": 0})
            row["total"] += 1
            key = {"Succeeded": "done", "Running": "running", "Failed": "failed", "Error": "failed"}.get(item.phase)
            if key:
                row[key] += 1
        return out

    def failed(self) -> list[Item]:
        return [i for i in self.items if i.phase in ("Failed", "Error")]


def _task_of(display_name: str) -> str:
    return display_name.split("(", 1)[0]


def snapshot(wf: dict) -> Snapshot:
    """Items per DAG task from the Workflow's nodes: a Retry node per item (its last child is the
    attempt's Pod node), or a Pod node alone for templates without retries."""
    status = wf.get("status") or {}
    nodes = workflow_nodes(wf)
    snap = Snapshot(
        name=wf["metadata"]["name"],
        phase=_phase(wf),
        message=str(status.get("message") or ""),
        nodes_known=nodes is not None,
    )
    stored = status.get("storedWorkflowTemplateSpec")
    if stored:
        from sitsflow.runner.workflow import entry_dag

        try:
            snap.order = [str(task["name"]) for task in entry_dag({"spec": stored})[0]]
        except SitsflowError:
            snap.order = []
    nodes = nodes or {}
    in_retry = {child for n in nodes.values() if n.get("type") == "Retry" for child in n.get("children", [])}
    for node_id, node in sorted(nodes.items(), key=lambda kv: (kv[1].get("startedAt") or "", kv[0])):
        kind = node.get("type")
        display = str(node.get("displayName") or node.get("name") or node_id)
        if kind in ("Skipped", "Omitted"):
            snap.skipped_tasks[_task_of(display)] = kind
            continue
        if not (kind == "Retry" or (kind == "Pod" and node_id not in in_retry)):
            continue
        pod_node = node_id if kind == "Pod" else (node.get("children") or [None])[-1]
        pod = nodes.get(pod_node or "", {})
        outputs = node.get("outputs") or pod.get("outputs") or {}
        snap.items.append(
            Item(
                task=_task_of(display),
                label=display,
                phase=str(node.get("phase") or "Pending"),
                message=str(node.get("message") or pod.get("message") or ""),
                pod_node=pod_node,
                started=node.get("startedAt"),
                finished=node.get("finishedAt"),
                result=outputs.get("result"),
            )
        )
        if snap.items[-1].task not in snap.order:
            snap.order.append(snap.items[-1].task)
    for task in snap.skipped_tasks:
        if task not in snap.order:
            snap.order.append(task)
    return snap


def _seconds(start: str | None, end: str | None) -> float:
    def parse(s: str) -> datetime:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))

    try:
        return max(0.0, (parse(end) - parse(start)).total_seconds()) if start and end else 0.0
    except ValueError:
        return 0.0


def stage_lines(snap: Snapshot) -> list[str]:
    """One line per stage: ``train: 3/8 done, 2 running, 1 failed``."""
    if not snap.nodes_known:
        return [
            "(per-stage progress unavailable: the node status is offloaded to Argo's database; "
            "`argo get` through the Argo Server shows it)"
        ]
    lines = []
    for task, row in snap.stages().items():
        if task in snap.skipped_tasks and not row["total"]:
            lines.append(f"{task}: {snap.skipped_tasks[task].lower()}")
            continue
        extra = "".join(f", {row[k]} {k}" for k in ("running", "failed") if row[k])
        lines.append(f"{task}: {row['done']}/{row['total']} done{extra}")
    return lines


def closing_line(snap: Snapshot, output_path: str, namespace: str) -> dict:
    """The last stdout line, shaped like ``sitsflow run``'s."""
    tasks: dict[str, int] = {}
    for item in snap.items:
        tasks[item.task] = tasks.get(item.task, 0) + 1
    done, skipped = count_tasks(item.result for item in snap.items)
    starts = [i.started for i in snap.items if i.started]
    ends = [i.finished for i in snap.items if i.finished]
    return {
        "output_path": output_path,
        "results": layout.final_results(output_path),
        "duration_s": round(_seconds(min(starts), max(ends)), 1) if starts and ends else 0.0,
        "tasks": tasks,
        "stage_tasks_done": done,
        "stage_tasks_skipped": skipped,
        "workflow": snap.name,
        "namespace": namespace,
        "phase": snap.phase,
    }


# --------------------------------------------------------------------------------------------
# Following a Workflow
# --------------------------------------------------------------------------------------------
class _Progress:
    """Feeds the runner's displays (rich bars on a terminal, log lines otherwise) from snapshots."""

    def __init__(self, progress: bool) -> None:
        from sitsflow.runner.display import make_display

        self.display = make_display(progress)
        self.seen: dict[str, str] = {}
        self.tasks: dict[str, int] = {}
        self.lines: list[str] = []
        self.plain = not progress

    def update(self, snap: Snapshot) -> None:
        for task, row in snap.stages().items():
            if row["total"] and self.tasks.get(task) != row["total"]:
                self.tasks[task] = row["total"]
                self.display.task_started(task, row["total"])
        for item in snap.items:
            before = self.seen.get(item.label)
            if before == item.phase:
                continue
            self.seen[item.label] = item.phase
            if item.phase == "Running" or (before is None and item.phase in ("Succeeded", "Failed", "Error")):
                self.display.node_started(item.label)
            if item.phase == "Succeeded":
                self.display.node_done(item.label, _seconds(item.started, item.finished))
            elif item.phase in ("Failed", "Error"):
                self.display.node_failed(item.label, _exit_code(item.message), item.message)
        for task, kind in snap.skipped_tasks.items():
            if self.seen.get(f"task:{task}") != kind:
                self.seen[f"task:{task}"] = kind
                self.display.task_done(task, "Skipped" if kind == "Skipped" else "Omitted")
        lines = stage_lines(snap)
        if self.plain and lines != self.lines:
            log.info("%s %s: %s", snap.name, snap.phase or "Pending", " | ".join(lines))
        self.lines = lines

    def close(self) -> None:
        self.display.close()


def _exit_code(message: str) -> int | None:
    match = re.search(r"exit code (\d+)", message)
    return int(match.group(1)) if match else None


def report_failures(cluster: Cluster, snap: Snapshot, tail_lines: int = LOG_TAIL_LINES) -> None:
    """Each failed item's message and the tail of its pod's log, on stderr."""
    failed = snap.failed()
    if not failed:
        return
    pods = cluster.pods_by_node(snap.name)
    for item in failed:
        log.error("%s failed: %s", item.label, item.message or "(no message)")
        pod = pods.get(item.pod_node or "")
        if pod is None:
            log.error(
                "  its pod is gone (deleted by podGC?); the log is archived under argo/%s/ in the bucket", snap.name
            )
            continue
        text = cluster.pod_log(pod, tail_lines)
        sys.stderr.write(f"----- last {tail_lines} log lines of pod {pod} ({item.label}) -----\n")
        sys.stderr.write(text if text.endswith("\n") or not text else text + "\n")
        sys.stderr.flush()


class _Signals:
    """Turns SIGINT/SIGTERM into :class:`Interrupted` while following a Workflow."""

    def __enter__(self) -> _Signals:
        self.saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.saved:
            signal.signal(s, self._raise)
        return self

    def _raise(self, signum: int, _frame: Any) -> None:
        for s in self.saved:  # a second signal must not cut the shutdown patch short
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def follow(
    cluster: Cluster,
    name: str,
    *,
    output_path: str | None,
    timeout: float | None,
    interval: float,
    progress: bool,
    stop_on_interrupt: bool = True,
) -> dict:
    """Follow Workflow ``name`` until it ends; report; return the closing line or raise.

    Raises :class:`WorkflowFailed` (exit 1), :class:`BadInputError` (exit 2: refused before any
    step ran), :class:`TransientError` (exit 75: unreachable, or ``timeout`` seconds passed) and
    :class:`Interrupted` after setting ``spec.shutdown`` (when ``stop_on_interrupt``).
    """
    display = _Progress(progress)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with _Signals():
            try:
                while True:
                    wf = cluster.get_workflow(name)
                    if wf is None:
                        raise BadInputError(f"Workflow {name!r} not found in namespace {cluster.namespace!r}")
                    snap = snapshot(wf)
                    display.update(snap)
                    if snap.phase in FINISHED:
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TransientError(
                            f"Workflow {name} still {snap.phase or 'Pending'} after --timeout {timeout:g} s; it goes "
                            f"on running (sitsflow status {name} -n {cluster.namespace}; the same submit attaches)"
                        )
                    time.sleep(interval)
            except Interrupted:
                if stop_on_interrupt:
                    log.warning("interrupted: stopping Workflow %s (spec.shutdown=%s)", name, SHUTDOWN)
                    cluster.stop_workflow(name)
                raise
    finally:
        display.close()
    for line in stage_lines(snap):
        log.info("%s", line)
    out = output_path or wf["metadata"].get("annotations", {}).get(ANNOTATION_OUTPUT, "")
    if snap.phase == "Succeeded":
        show_results(out)
        return closing_line(snap, out, cluster.namespace)
    if not snap.items and snap.nodes_known:
        raise BadInputError(
            f"Workflow {name} was refused before any step ran ({snap.phase}): {snap.message or 'no message'}"
        )
    report_failures(cluster, snap)
    raise WorkflowFailed(f"Workflow {name} {snap.phase}: {snap.message or 'a step failed'}")


def show_results(output_path: str) -> None:
    """RESULTS.txt and the final products' URIs, on stderr (stdout carries the JSON line)."""
    if not output_path:
        return
    results = layout.final_results(output_path)
    try:
        text = storage.read_text(results)
    except SitsflowError as exc:
        log.warning("no RESULTS.txt to show (%s)", exc)
        return
    sys.stderr.write(f"----- {results} -----\n{text}")
    if not text.endswith("\n"):
        sys.stderr.write("\n")
    for uri in storage.list_files(layout.join(output_path, layout.FINAL)):
        sys.stderr.write(f"output: {uri}\n")
    sys.stderr.flush()


def show_status(cluster: Cluster, name: str) -> dict:
    """Log the per-stage view of Workflow ``name`` and the failed items; return the closing line."""
    wf = cluster.get_workflow(name)
    if wf is None:
        raise BadInputError(f"Workflow {name!r} not found in namespace {cluster.namespace!r}")
    snap = snapshot(wf)
    log.info("Workflow %s: %s%s", name, snap.phase or "Pending", f" ({snap.message})" if snap.message else "")
    for line in stage_lines(snap):
        log.info("%s", line)
    for item in snap.failed():
        log.error("%s failed: %s", item.label, item.message or "(no message)")
    out = wf["metadata"].get("annotations", {}).get(ANNOTATION_OUTPUT, "")
    return closing_line(snap, out, cluster.namespace)


def show_logs(cluster: Cluster, name: str, stage: str | None, tail_lines: int | None) -> int:
    """Write the logs of the Workflow's pods (of one stage) to stderr; returns how many."""
    wf = cluster.get_workflow(name)
    if wf is None:
        raise BadInputError(f"Workflow {name!r} not found in namespace {cluster.namespace!r}")
    snap = snapshot(wf)
    known = set(snap.order)
    if stage is not None and stage not in known:
        raise BadInputError(f"--stage {stage!r}: Workflow {name} has no such stage; stages: {', '.join(snap.order)}")
    pods = cluster.pods_by_node(name)
    shown = 0
    for item in snap.items:
        if stage is not None and item.task != stage:
            continue
        pod = pods.get(item.pod_node or "")
        if pod is None:
            log.info("%s (%s): pod gone", item.label, item.phase)
            continue
        sys.stderr.write(f"----- {item.label} ({item.phase}), pod {pod} -----\n")
        text = cluster.pod_log(pod, tail_lines)
        sys.stderr.write(text if text.endswith("\n") or not text else text + "\n")
        shown += 1
    sys.stderr.flush()
    return shown
