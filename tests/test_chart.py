"""The Helm chart: every ci/ scenario renders with Helm's own engine and validates.

Core resources are checked with kubernetes-validate (strict, Kubernetes 1.33); the
WorkflowTemplate with Argo's official schema and Hera's (both strict) and the semantic lint, and
it still runs locally. values.schema.json is shown rejecting bad values.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from argo_checks import argo_schema, hera_schema, lint, schema_errors
from sitsflow.runner import default_workflow_path, run_workflow

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "sitsflow"
SCENARIOS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
ARGO_SCHEMA_PATH = Path(__file__).with_name("data") / "argo-workflows-schema.json"
KUBERNETES = "1.33"


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def scenario_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()) or {}


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest the chart renders (NOTES.txt aside), as dicts."""
    rendered = chart.render(values, name="demo", namespace="runs")
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def rendered(chart: helm_python.Chart) -> dict[str, list[dict[str, Any]]]:
    return {name: render(chart, scenario_values(name)) for name in SCENARIOS}


@pytest.fixture(scope="module")
def strict_argo() -> dict[str, Any]:
    return argo_schema(json.loads(ARGO_SCHEMA_PATH.read_text()))


def parameters(template: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p.get("value") for p in template["spec"]["arguments"]["parameters"]}


def test_scenarios_exist() -> None:
    assert SCENARIOS == ["default", "eks-irsa", "external-s3", "gpu-cluster", "onprem-s3"]


def test_chart_lints(chart: helm_python.Chart) -> None:
    for name in SCENARIOS:
        report = helm_python.lint(str(CHART), scenario_values(name), strict=True)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_renders_and_validates(
    rendered: dict[str, list[dict[str, Any]]], strict_argo: dict[str, Any], name: str
) -> None:
    docs = rendered[name]
    kinds = sorted(d["kind"] for d in docs)
    assert "Secret" not in kinds  # credentials are referenced, never written
    assert kinds.count("WorkflowTemplate") == 1
    for doc in docs:
        if doc["kind"] == "WorkflowTemplate":
            assert schema_errors(doc, strict_argo) == []
            assert schema_errors(doc, hera_schema()) == []
            assert lint(doc) == []
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_kubernetes_validate_catches_a_planted_error(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    role = copy.deepcopy(by_kind(rendered["default"], "Role")[0])
    role["rules"][0]["verb"] = role["rules"][0].pop("verbs")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, KUBERNETES, strict=True)


def test_default_scenario(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    template = by_kind(docs, "WorkflowTemplate")[0]
    assert template["metadata"]["name"] == "sitsflow"
    assert template["spec"]["serviceAccountName"] == "demo-sitsflow"
    assert template["spec"]["parallelism"] == 20
    assert template["spec"]["podGC"] == {"strategy": "OnPodSuccess"}
    assert template["spec"]["artifactRepositoryRef"] == {
        "configMap": "demo-sitsflow-artifact-repositories", "key": "sitsflow-s3",
    }  # fmt: skip
    params = parameters(template)
    assert params["image"] == "ghcr.io/sitsflow/sitsflow:0.1.0"
    assert params["gpu-image"] == "ghcr.io/sitsflow/sitsflow:0.1.0-gpu"
    assert template["spec"]["activeDeadlineSeconds"] == 604800
    for key in ("podMetadata", "podPriorityClassName", "imagePullSecrets"):
        assert key not in template["spec"]
    assert params["s3-secret"] == "sitsflow-s3" and params["s3-endpoint"] == ""
    assert json.loads(params["gpu-tolerations"]) == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    assert params["retry-limit"] == "3" and params["retry-backoff"] == "30s"
    assert params["retry-backoff-cap"] == "10m"
    assert params["max-shards"] == "100"
    assert "value" not in next(
        p for p in template["spec"]["arguments"]["parameters"] if p["name"] == "config"
    )
    assert [d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")] == ["demo-sitsflow"]
    role = by_kind(docs, "Role")[0]
    assert role["rules"] == [
        {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
         "verbs": ["create", "patch"]}
    ]  # fmt: skip
    binding = by_kind(docs, "RoleBinding")[0]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "demo-sitsflow", "namespace": "runs"}
    ]
    repository = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["sitsflow-s3"])
    assert repository["s3"]["bucket"] == "sitsflow"
    assert repository["s3"]["accessKeySecret"] == {"name": "sitsflow-s3", "key": "AWS_ACCESS_KEY_ID"}


def test_gpu_cluster_scenario(rendered: dict[str, list[dict[str, Any]]]) -> None:
    template = by_kind(rendered["gpu-cluster"], "WorkflowTemplate")[0]
    params = parameters(template)
    assert json.loads(params["gpu-node-selector"]) == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"
    }
    assert json.loads(params["gpu-tolerations"])[0]["value"] == "present"
    assert json.loads(params["cpu-node-selector"]) == {"cloud.google.com/gke-nodepool": "cpu-pool"}
    assert params["pool-label"] == "cloud.google.com/gke-nodepool"
    assert params["image"] == "europe-docker.pkg.dev/my-project/sitsflow/sitsflow:0.1.0"
    assert params["gpu-image"] == "europe-docker.pkg.dev/my-project/sitsflow/sitsflow:0.1.0-gpu"
    assert params["retry-limit"] == "5" and params["retry-backoff"] == "1m"
    assert params["retry-backoff-cap"] == "5m"
    assert params["max-shards"] == "400"  # a cluster with more GPUs than 100 shards keep busy
    assert template["spec"]["parallelism"] == 8
    assert template["spec"]["activeDeadlineSeconds"] == 259200
    assert template["spec"]["imagePullSecrets"] == [{"name": "artifact-registry"}]
    assert template["spec"]["podPriorityClassName"] == "batch-high"
    assert template["spec"]["podMetadata"] == {
        "labels": {"team": "landcover", "kueue.x-k8s.io/queue-name": "gpu-queue"},
        "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    }
    for entry in template["spec"]["templates"]:  # the extra environment reaches every step
        if "container" in entry:
            env = {v["name"]: v.get("value") for v in entry["container"]["env"]}
            assert env["SITSFLOW_READERS"] == "4" and env["GDAL_CACHEMAX"] == "512"
            assert env["AWS_REGION"] == "auto" and "AWS_ACCESS_KEY_ID" in env
    repository = yaml.safe_load(by_kind(rendered["gpu-cluster"], "ConfigMap")[0]["data"]["sitsflow-s3"])
    assert repository["s3"]["endpoint"] == "storage.googleapis.com"  # HMAC keys, S3 XML API
    assert repository["s3"]["accessKeySecret"]["name"] == "gcs-hmac-keys"
    account = by_kind(rendered["gpu-cluster"], "ServiceAccount")[0]
    assert account["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "sitsflow@my-project.iam.gserviceaccount.com"
    }


def test_external_s3_scenario(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["external-s3"]
    template = by_kind(docs, "WorkflowTemplate")[0]
    params = parameters(template)
    assert params["s3-endpoint"] == "https://s3.gra.io.cloud.ovh.net"
    assert params["s3-secret"] == "landcover-s3-keys"
    assert template["metadata"]["name"] == "landcover"
    assert template["metadata"]["labels"]["team"] == "landcover"
    assert template["spec"]["serviceAccountName"] == "workflows"
    assert template["spec"]["podGC"] == {"strategy": "OnWorkflowSuccess"}
    assert by_kind(docs, "ServiceAccount") == []  # an existing account
    assert by_kind(docs, "RoleBinding")[0]["subjects"][0]["name"] == "workflows"
    repository = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["sitsflow-s3"])
    assert repository["s3"]["endpoint"] == "s3.gra.io.cloud.ovh.net"
    assert repository["s3"]["keyFormat"] == "logs/{{workflow.name}}/{{pod.name}}"


def test_eks_irsa_scenario_is_keyless(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """No Secret anywhere: the artifact repository uses the SDK's credentials (Argo mounts an
    artifact repository's key Secrets as non-optional volumes) and no container references one."""
    docs = rendered["eks-irsa"]
    template = by_kind(docs, "WorkflowTemplate")[0]
    params = parameters(template)
    assert params["image"].endswith("/sitsflow@sha256:" + "4f1a3c9e0b7d2a6c8e5f1b3d7a9c0e2f4b6d8a1c3e5f7091b2d4f6a8c0e1f3a5")
    assert "@sha256:9e8d7c6b" in params["gpu-image"] and ":0.1.0" not in params["gpu-image"]
    assert "secretKeyRef" not in json.dumps(template)
    for entry in template["spec"]["templates"]:
        if "container" in entry:
            env = {v["name"]: v.get("value") for v in entry["container"]["env"]}
            assert env["AWS_REGION"] == "eu-west-1"
    repository = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["sitsflow-s3"])
    assert repository["s3"]["useSDKCreds"] is True
    assert "accessKeySecret" not in repository["s3"] and "secretKeySecret" not in repository["s3"]
    assert repository["s3"]["region"] == "eu-west-1"
    account = by_kind(docs, "ServiceAccount")[0]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert template["spec"]["podMetadata"] == {"annotations": {"karpenter.sh/do-not-disrupt": "true"}}


def test_onprem_s3_scenario(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["onprem-s3"]
    params = parameters(by_kind(docs, "WorkflowTemplate")[0])
    assert params["s3-endpoint"] == "http://minio.storage.svc.cluster.local:9000"
    assert json.loads(params["gpu-tolerations"]) == []
    repository = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["sitsflow-s3"])
    assert repository["s3"]["endpoint"] == "minio.storage.svc.cluster.local:9000"
    assert repository["s3"]["insecure"] is True
    assert repository["s3"]["secretKeySecret"] == {"name": "minio-sitsflow", "key": "AWS_SECRET_ACCESS_KEY"}


# --- Pod Security Standards, "restricted" profile ------------------------------------------------

#: Volume types the restricted profile allows.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def restricted_violations(spec: dict[str, Any], template: dict[str, Any]) -> list[str]:
    """The rules of the Pod Security "restricted" profile (Kubernetes 1.33) that the pod of one
    container template breaks, the workflow's pod-level settings (``spec.securityContext``,
    ``spec.hostNetwork``...) merged in as Argo does."""
    problems: list[str] = []
    pod = spec.get("securityContext") or {}
    container = template["container"].get("securityContext") or {}
    name = template["name"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key) or template.get(key):
            problems.append(f"{name}: {key}")
    if container.get("privileged"):
        problems.append(f"{name}: privileged")
    if container.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation must be false")
    caps = container.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        problems.append(f"{name}: capabilities.drop must include ALL")
    if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
        problems.append(f"{name}: capabilities.add beyond NET_BIND_SERVICE")
    if container.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
        problems.append(f"{name}: runAsNonRoot must be true")
    if container.get("runAsUser", pod.get("runAsUser")) == 0:
        problems.append(f"{name}: runAsUser 0")
    seccomp = container.get("seccompProfile") or pod.get("seccompProfile") or {}
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
    for port in template["container"].get("ports") or []:
        if port.get("hostPort"):
            problems.append(f"{name}: hostPort")
    for volume in (template.get("volumes") or []) + (spec.get("volumes") or []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{name}: volume {volume['name']} of type {sorted(kinds)}")
    return problems


@pytest.mark.parametrize("name", SCENARIOS)
def test_rendered_pods_pass_the_restricted_profile(
    rendered: dict[str, list[dict[str, Any]]], name: str
) -> None:
    template = by_kind(rendered[name], "WorkflowTemplate")[0]
    containers = [t for t in template["spec"]["templates"] if "container" in t]
    assert len(containers) == 9
    for entry in containers:
        assert restricted_violations(template["spec"], entry) == []


def test_restricted_check_catches_planted_violations(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    spec = copy.deepcopy(by_kind(rendered["default"], "WorkflowTemplate")[0]["spec"])
    train = next(t for t in spec["templates"] if t["name"] == "train")
    train["container"]["securityContext"]["allowPrivilegeEscalation"] = True
    train["container"]["securityContext"]["capabilities"] = {"add": ["SYS_ADMIN"]}
    train["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    spec["securityContext"].pop("seccompProfile")
    train["container"]["securityContext"].pop("seccompProfile")
    spec["securityContext"]["runAsNonRoot"] = False
    train["container"]["securityContext"].pop("runAsNonRoot")
    problems = restricted_violations(spec, train)
    for expected in ("allowPrivilegeEscalation", "drop must include ALL", "beyond NET_BIND",
                     "hostPath", "seccompProfile", "runAsNonRoot"):
        assert any(expected in p for p in problems), (expected, problems)


def test_optional_resources_can_be_turned_off(chart: helm_python.Chart) -> None:
    docs = render(chart, {"rbac": {"create": False}, "s3": {"artifactRepository": {"enabled": False}}})
    assert sorted(d["kind"] for d in docs) == ["ServiceAccount", "WorkflowTemplate"]
    assert "artifactRepositoryRef" not in by_kind(docs, "WorkflowTemplate")[0]["spec"]


def test_chart_ships_the_rendered_pipeline(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The chart's template is the package's sitsflow.yaml; Helm changes only what values set."""
    assert (CHART / "files" / "sitsflow.yaml").read_text() == (
        default_workflow_path()
    ).read_text()
    pipeline = yaml.safe_load(default_workflow_path().read_text())
    template = copy.deepcopy(by_kind(rendered["default"], "WorkflowTemplate")[0])
    assert template["spec"]["templates"] == pipeline["spec"]["templates"]
    for key in ("serviceAccountName", "artifactRepositoryRef", "podGC", "parallelism",
                "activeDeadlineSeconds"):
        template["spec"].pop(key)
        pipeline["spec"].pop(key, None)
    template["spec"].pop("arguments")
    pipeline["spec"].pop("arguments")
    assert template["spec"] == pipeline["spec"]


def test_exact_helm_install_stream(chart: helm_python.Chart) -> None:
    """`helm install --dry-run=client` gives the same objects as the offline render."""
    release = helm_python.Config(storage_driver="memory").install(
        chart, "demo", values={}, namespace="runs", dry_run="client"
    )
    docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in render(chart, {}))


BAD_VALUES = {
    "unknown top-level key": ({"imag": {"repository": "x"}}, "additional properties 'imag'"),
    "parallelism 0": ({"workflowTemplate": {"parallelism": 0}}, "/workflowTemplate/parallelism"),
    "parallelism text": ({"workflowTemplate": {"parallelism": "many"}}, "/workflowTemplate/parallelism"),
    "pod GC strategy": ({"workflowTemplate": {"podGC": "Never"}}, "/workflowTemplate/podGC"),
    "retry limit": ({"workflowTemplate": {"retryLimit": -1}}, "/workflowTemplate/retryLimit"),
    "max shards": ({"workflowTemplate": {"maxShards": 0}}, "/workflowTemplate/maxShards"),
    "retry backoff": ({"workflowTemplate": {"retryBackoff": "soon"}}, "/workflowTemplate/retryBackoff"),
    "bucket name": ({"s3": {"bucket": "My_Bucket"}}, "/s3/bucket"),
    "endpoint scheme": ({"s3": {"endpoint": "s3.example.org"}}, "/s3/endpoint"),
    "secret name": ({"s3": {"credentialsSecret": "Keys!"}}, "/s3/credentialsSecret"),
    "secret inlined": ({"s3": {"accessKey": "AKIA..."}}, "additional properties 'accessKey'"),
    "toleration operator": (
        {"gpu": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Maybe"}]}},
        "/gpu/tolerations/0/operator",
    ),
    "node selector value": ({"gpu": {"nodeSelector": {"pool": 3}}}, "/gpu/nodeSelector/pool"),
    "pool label": ({"poolLabel": "not a label"}, "/poolLabel"),
    "image tag": ({"image": {"tag": "0.1 gpu"}}, "/image/tag"),
    "image digest": ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    "gpu image digest": ({"gpuImage": {"digest": "md5:" + "0" * 32}}, "/gpuImage/digest"),
    "pull secret": ({"imagePullSecrets": ["registry"]}, "/imagePullSecrets/0"),
    "pod label": ({"pod": {"labels": {"team": "land cover"}}}, "/pod/labels/team"),
    "priority class": ({"pod": {"priorityClassName": "High!"}}, "/pod/priorityClassName"),
    "env without value": ({"pod": {"env": [{"name": "GDAL_CACHEMAX"}]}}, "/pod/env/0"),
    "env owned by the chart": (
        {"pod": {"env": [{"name": "SITSFLOW_GPUS", "value": "2"}]}}, "/pod/env/0/name",
    ),
    "run deadline": ({"workflowTemplate": {"activeDeadlineSeconds": 0}}, "/workflowTemplate/activeDeadlineSeconds"),
    "backoff cap": ({"workflowTemplate": {"retryBackoffCap": "ten"}}, "/workflowTemplate/retryBackoffCap"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_schema_rejects_bad_values(chart: helm_python.Chart, case: str) -> None:
    values, where = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError):
        chart.render(values, name="demo", namespace="runs")


def test_every_value_is_documented() -> None:
    """Each key of values.yaml has a `# --` comment on the line above (helm-docs), except maps
    whose keys are documented themselves."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    list_indent: int | None = None  # keys inside a list entry belong to the documented list
    for number, line in enumerate(lines):
        if line.strip().startswith("- "):
            list_indent = len(line) - len(line.lstrip())
            continue
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = match.groups()
        if list_indent is not None and len(indent) >= list_indent:
            continue
        list_indent = None
        next_lines = [
            n for n in lines[number + 1 :] if n.strip() and not n.strip().startswith("#")
        ]
        is_parent = (
            not rest.strip()
            and bool(next_lines)
            and len(next_lines[0]) - len(next_lines[0].lstrip()) > len(indent)
            and not next_lines[0].strip().startswith("- ")
        )
        if is_parent:
            continue
        if number == 0 or not lines[number - 1].strip().startswith("# -- "):
            undocumented.append(key)
    assert undocumented == []
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert sorted(values) == sorted(schema["properties"])  # the schema covers every value


FAKE = """
import json, os, sys
args = sys.argv[1:]
stage = " ".join(args[:2]) if args[0] == "plan" else args[0]
out = {
    "prepare": json.dumps({"config": "/r.cfg", "resources": json.loads(os.environ["FAKE_PODS"])}),
    # a plan of one task (sitsflow.shards.write_plan)
    "plan training": '{"items": 1, "shards": "1", "per_shard": 1, "deadline": "3600"}',
    "plan selection": '{"items": 1, "shards": "1", "per_shard": 1, "deadline": "3600"}',
    "plan inference": '{"items": 1, "shards": "1", "per_shard": 1, "deadline": "3600"}',
}
print(out.get(stage, "{}"))
"""


def test_chart_workflow_template_runs_locally(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart installs is what `sitsflow run` executes: the GPU scenario's tolerations
    reach the training pods."""
    from sitsflow.config.resources import ResourcesSection, stage_pods

    template = copy.deepcopy(by_kind(rendered["gpu-cluster"], "WorkflowTemplate")[0])
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    for entry in template["spec"]["templates"]:
        if "container" in entry:
            entry["container"]["command"] = [sys.executable, str(fake)]
    path = tmp_path / "wt.yaml"
    path.write_text(yaml.safe_dump(template))
    params = parameters(template)
    pods = stage_pods(
        ResourcesSection(),
        pool_label=params["pool-label"],
        gpu_node_selector=params["gpu-node-selector"],
        cpu_node_selector=params["cpu-node-selector"],
        gpu_tolerations=params["gpu-tolerations"],
        cpu_tolerations=params["cpu-tolerations"],
    )
    monkeypatch.setenv("FAKE_PODS", json.dumps(pods))
    tasks = run_workflow(path, {"config": "/c.cfg", "output-path": "/out"})["tasks"]
    train = tasks["train"]["pods"][0]
    assert train["tolerations"] == json.loads(params["gpu-tolerations"])
    assert train["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert tasks["merge"]["pods"][0]["nodeSelector"] == {"cloud.google.com/gke-nodepool": "cpu-pool"}


# --- server-side validation by a real Kubernetes API server with Argo's full CRDs ---------------


def _server_side_apply(kube_server: Any, namespace: str, doc: dict[str, Any]) -> Any:
    """Server-side apply (dry run) with strict field validation: what `kubectl apply
    --server-side --dry-run=server --validate=strict` asks of the API server."""
    from kubernetes import client

    custom = client.CustomObjectsApi(kube_server.api_client())
    response = custom.patch_namespaced_custom_object(
        "argoproj.io", "v1alpha1", namespace, "workflowtemplates", doc["metadata"]["name"], doc,
        field_manager="sitsflow-tests", force=True, dry_run="All", field_validation="Strict",
        _content_type="application/apply-patch+yaml", _preload_content=False,
    )  # fmt: skip
    return json.loads(response.data)  # the object as the server would store it


@pytest.mark.kube
def test_api_server_accepts_the_template_and_every_scenario(
    kube_server: Any, kube_namespace: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    committed = yaml.safe_load((REPO / "services" / "sitsflow" / "workflows" / "sitsflow.yaml").read_text())
    applied = _server_side_apply(kube_server, kube_namespace, committed)
    assert applied["spec"]["synchronization"] == committed["spec"]["synchronization"]
    for name in SCENARIOS:
        template = by_kind(rendered[name], "WorkflowTemplate")[0]
        applied = _server_side_apply(kube_server, kube_namespace, template)
        assert applied["spec"]["templates"] == template["spec"]["templates"], name


BROKEN_FOR_THE_SERVER = {
    "unknown field": (lambda t: t["spec"]["templates"][1]["container"].update(agrs=["x"]), "agrs"),
    "deadline on a DAG": (
        lambda t: next(x for x in t["spec"]["templates"] if "dag" in x).update(activeDeadlineSeconds=60),
        "activeDeadlineSeconds",
    ),
    "parallelism text": (lambda t: t["spec"].update(parallelism="many"), "parallelism"),
}


@pytest.mark.kube
@pytest.mark.parametrize("case", list(BROKEN_FOR_THE_SERVER))
def test_api_server_refuses_a_broken_template(kube_server: Any, kube_namespace: str, case: str) -> None:
    from kubernetes.client.exceptions import ApiException

    mutate, where = BROKEN_FOR_THE_SERVER[case]
    broken = yaml.safe_load((REPO / "services" / "sitsflow" / "workflows" / "sitsflow.yaml").read_text())
    mutate(broken)
    with pytest.raises(ApiException) as info:
        _server_side_apply(kube_server, kube_namespace, broken)
    # a field the schema does not declare or of the wrong type fails server-side apply's typed patch
    # ("failed to create typed patch object", HTTP 500); a CEL rule answers 422
    assert info.value.status in (422, 500), (info.value.status, info.value.body)
    assert where in str(info.value.body) and "Failure" in str(info.value.body)
