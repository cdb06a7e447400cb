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
    assert SCENARIOS == ["default", "external-s3", "gpu-cluster"]


def test_chart_lints(chart: helm_python.Chart) -> None:
    for name in SCENARIOS:
        report = helm_python.lint(str(CHART), scenario_values(name), strict=True)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("name", ["default", "external-s3", "gpu-cluster"])
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
    assert params["s3-secret"] == "sitsflow-s3" and params["s3-endpoint"] == ""
    assert json.loads(params["gpu-tolerations"]) == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    assert params["retry-limit"] == "3" and params["retry-backoff"] == "30s"
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
    assert params["image"].endswith(":0.1.0-gpu")
    assert params["retry-limit"] == "5" and params["retry-backoff"] == "1m"
    assert template["spec"]["parallelism"] == 8
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
    for key in ("serviceAccountName", "artifactRepositoryRef", "podGC", "parallelism"):
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
    "plan training": '[{"region": 1, "seed": 0, "hyp": 0}]',
    "plan selection": '[{"region": 1, "seed": 0}]',
    "plan inference": '[{"tile": "T1", "chunk": 0, "seed": 0}]',
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
    )
    monkeypatch.setenv("FAKE_PODS", json.dumps(pods))
    tasks = run_workflow(path, {"config": "/c.cfg"})["tasks"]
    train = tasks["train"]["pods"][0]
    assert train["tolerations"] == json.loads(params["gpu-tolerations"])
    assert train["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert tasks["merge"]["pods"][0]["nodeSelector"] == {"cloud.google.com/gke-nodepool": "cpu-pool"}
