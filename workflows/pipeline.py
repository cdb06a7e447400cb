"""The sitsflow pipeline, defined once: an Argo WorkflowTemplate built with Hera.

``python workflows/pipeline.py`` renders it to ``services/sitsflow/workflows/sitsflow.yaml``
(committed, shipped in the package, so an installed ``sitsflow run`` finds it). Argo runs
that YAML on a cluster (the Helm chart in ``charts/sitsflow`` installs it); ``sitsflow run``
executes the same YAML on one machine (``sitsflow.runner``). ``tests/test_workflow.py`` fails when
the committed YAML is stale (``SITSFLOW_REGENERATE=1`` rewrites it).

The DAG (one word per stage; template name = ``sitsflow`` subcommand)::

    prepare ─┬─ sample ─┬─ plan-training ── train* ─┐
             │          └─ plan-selection ──────────┴─ select* ─┐
             └─ plan-inference ─────────────────────────────────┴─ infer* ── merge

    (* fan-out by shards: withSequence over 0 .. shards-1, shards from the plan step before it)

``prepare`` prints one JSON object: ``config``, the URI of the resolved configuration every later
step reads (so a run never mixes two versions of it), and ``resources``, each stage's pod settings
from iota2's resource blocks of the ``.cfg`` (``sitsflow.config.resources.stage_pods``). Tasks read
both with Argo expressions (``{{=jsonpath(tasks.prepare.outputs.result, '$.config')}}``), which the
local runner evaluates too.

Fan-out by shards (``sitsflow.shards``): each ``plan-*`` step stores its full task list under the
output path (``plans/<stage>.json``) and prints a small JSON object (``shards``, ``deadline``, the
plan's URI and size); the stage after it runs ``withSequence`` over ``0 .. shards-1`` and each task
``sitsflow <stage> --shard K`` runs the tasks of its shard, skipping those already done. No list of
tasks passes through ``outputs.result`` or ``withParam``, so neither Argo's 256 KiB result limit
nor the size of the workflow object grows with the run: at most ``max-shards`` tasks per fan-out
(one task per shard below it, as a plain fan-out), each with the deadline of its shard (the iota2
``walltime`` of one task times the tasks of the largest shard).

Scheduling: every stage template takes ``cpu``, ``memory``, ``deadline`` (and ``gpu`` for train
and infer) and a ``node-selector`` (JSON) as inputs and applies them through ``podSpecPatch`` and
``activeDeadlineSeconds``; its container also carries the built-in defaults as plain
``resources``. Train and infer request ``nvidia.com/gpu``, tolerate ``gpu-tolerations``, and mount
a memory-backed emptyDir at ``/dev/shm`` for data-loader workers; every other step runs on CPU
nodes (``cpu-node-selector``, ``cpu-tolerations``). Each container template retries
(``retryStrategy``, not on the DAG) only transient failures: exit code 75, or a pod that errored
because it was deleted, evicted or its node shut down; never exit code 2.

Hera's process-wide ``global_config`` is not used: image, namespace and service account are given
explicitly (the chart sets the service account).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from hera.workflows import (
    DAG,
    Container,
    EmptyDirVolume,
    Env,
    Parameter,
    SecretEnv,
    Task,
    WorkflowTemplate,
    models,
)

from sitsflow.config.resources import BUILTIN, GPU_STAGES
from sitsflow.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT
from sitsflow.shards import MAX_SHARDS

NAME = "sitsflow"
ENTRYPOINT = "pipeline"
#: The Dockerfile's ``cpu`` target (prepare, sample, the plans, select, merge) and ``gpu`` target
#: (train, infer: CUDA torch, which also runs on a CPU node when a block sets ``nb_gpu: 0``).
DEFAULT_IMAGE = "sitsflow:0.1.0"
DEFAULT_GPU_IMAGE = "sitsflow:0.1.0-gpu"
DEFAULT_S3_SECRET = "sitsflow-s3"
REPO = Path(__file__).resolve().parents[1]
#: The rendered YAML, package data of sitsflow (``sitsflow.runner.default_workflow_path``).
YAML_PATH = REPO / "services" / "sitsflow" / "workflows" / "sitsflow.yaml"
#: The same YAML shipped in the Helm chart (``.Files.Get``), kept identical by :func:`main`.
CHART_COPY = REPO / "charts" / "sitsflow" / "files" / "sitsflow.yaml"

#: Pods of the workflow running at once (``spec.parallelism``); the chart's
#: ``workflowTemplate.parallelism`` value overrides it (``argo submit`` has no flag for it).
PARALLELISM = 20
#: The whole run's deadline (``spec.activeDeadlineSeconds``, 7 days): pods that can never be
#: scheduled (no GPU node) end the run instead of waiting for ever. The chart's
#: ``workflowTemplate.activeDeadlineSeconds`` overrides it.
WORKFLOW_DEADLINE = 7 * 86400
#: Failure model (Argo >= 3.7). Each attempt has its own deadline, the stage's iota2 walltime
#: (``activeDeadlineSeconds`` of the template, from prepare's ``resources``); a failed attempt is
#: retried at most ``retry-limit`` times, after ``retry-backoff`` doubled at each retry and capped
#: at ``retry-backoff-cap`` (``backoff.cap``, Argo 3.7). No ``backoff.maxDuration``: Argo counts it
#: from the first attempt's start and also cuts the retried pod's deadline to it, so a step that
#: fails after running longer than it would never be retried.
RETRY_LIMIT = "3"
RETRY_BACKOFF = "30s"
RETRY_FACTOR = 2
RETRY_BACKOFF_CAP = "10m"
# sitsflow's exit codes (sitsflow.errors): EXIT_BAD_INPUT (2) is never retried, EXIT_TRANSIENT
# (75: storage trouble that outlived its own retries, or SIGTERM: the pod was deleted, evicted or
# preempted) is.
#: What Kubernetes and Argo write in a node's message when a pod dies for reasons outside the
#: program, matched case-insensitively against ``lastRetry.message`` whatever the node's status:
#: Argo marks a pod that the kubelet evicted or that a node shutdown killed ``Failed`` with the
#: pod's own status message ("The node was low on resource: memory. ...", "Pod was terminated in
#: response to imminent node shutdown.", "Preempted in order to admit critical pod"), and a pod
#: that vanished (deleted, preempted by the scheduler, its node lost) ``Error`` with "pod deleted".
TRANSIENT_MESSAGES = (
    "pod deleted|node was low on resource|evict|preempt|node shutdown|node is shutting down"
    "|node lost|nodelost|node is not ready|node not ready"
)
#: Never retried, whatever else matches: an attempt stopped at its deadline ("Pod was active on the
#: node longer than the specified deadline", "Step exceeded its deadline": the kubelet's SIGTERM
#: makes sitsflow exit 75 there too) would only run out of time again.
NEVER_RETRIED_MESSAGES = "deadline"
#: The retry rule (``retryStrategy.expression``, Argo's expr-lang; ``lastRetry.message`` needs Argo
#: >= 3.5): exit 75, or a transient message; never exit 2 nor a deadline exceeded.
RETRY_EXPRESSION = (
    f"lastRetry.exitCode != '{EXIT_BAD_INPUT}'"
    f" && !(lastRetry.message matches '(?i)({NEVER_RETRIED_MESSAGES})')"
    f" && (lastRetry.exitCode == '{EXIT_TRANSIENT}'"
    f" || lastRetry.message matches '(?i)({TRANSIENT_MESSAGES})')"
)
#: The run's Argo mutex (``spec.synchronization``, Argo >= 3.6): two workflows writing to one
#: output path never run at once (the second waits), whatever their names or configurations. The
#: output path must be known when the workflow starts, before ``prepare`` reads the .cfg: runs that
#: leave the ``output-path`` parameter empty all share one mutex (they queue, safe). The name is
#: ``sitsflow-`` and the SHA-256 of the output path (hex), never the path itself: Argo keys a lock
#: as ``<namespace>/Mutex/<name>`` and, in the versions with lock selectors, cuts that key at the
#: first ``?`` when it decodes it (workflow/sync/lock_name.go, ``DecodeLockName``), so a path with
#: ``?`` (or ``&``, ``=``) would not decode to the lock that was encoded. Argo evaluates the
#: expression when it substitutes the workflow's global parameters (sprig's ``sha256sum``).
RUN_MUTEX = "sitsflow-{{=sprig.sha256sum(workflow.parameters['output-path'])}}"
#: Every container passes the Pod Security "restricted" profile (with the pod's non-root user).
CONTAINER_SECURITY = models.SecurityContext(
    allow_privilege_escalation=False,
    capabilities=models.Capabilities(drop=["ALL"]),
    run_as_non_root=True,
    seccomp_profile=models.SeccompProfile(type="RuntimeDefault"),
)

HEADER = (
    "# Generated by workflows/pipeline.py (python workflows/pipeline.py); do not edit by hand.\n"
    "# Argo WorkflowTemplate of the sitsflow pipeline; `sitsflow run` executes it locally.\n"
)

#: prepare's stdout, a JSON object (config URI and per-stage pod settings).
PREPARED = "tasks.prepare.outputs.result"
#: Where every later step finds the resolved configuration.
RESOLVED_CONFIG = f"{{{{=jsonpath({PREPARED}, '$.config')}}}}"

#: The S3 credentials every container reads from the Secret named by ``s3-secret``.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

#: Requests of the small steps (prepare and the plan-* steps): they read the configuration only.
SMALL_REQUESTS = {"cpu": "500m", "memory": "1Gi"}

#: Scheduling parameters with their defaults (documented in workflows/README.md, docs/deploy.md).
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@dataclass(frozen=True)
class Stage:
    """One container template of the pipeline.

    ``name`` is the template (and DAG task) name; ``subcommand`` the ``sitsflow`` words that run
    it; ``plan`` the plan step a fan-out stage runs the shards of (``--shard K``, from the input
    parameter ``shard``; its shard count and deadline from that step's output); ``resources`` the
    key of the stage in prepare's ``resources`` (None: a small step with fixed requests).
    """

    name: str
    subcommand: tuple[str, ...]
    plan: str | None = None
    resources: str | None = None

    @property
    def gpu(self) -> bool:
        """Whether the stage requests GPUs (train, infer)."""
        return self.resources in GPU_STAGES


SAMPLE = Stage("sample", ("sample",), resources="sample")
PLAN_TRAINING = Stage("plan-training", ("plan", "training"))
TRAIN = Stage("train", ("train",), "plan-training", resources="train")
PLAN_SELECTION = Stage("plan-selection", ("plan", "selection"))
SELECT = Stage("select", ("select",), "plan-selection", resources="select")
PLAN_INFERENCE = Stage("plan-inference", ("plan", "inference"))
INFER = Stage("infer", ("infer",), "plan-inference", resources="infer")
MERGE = Stage("merge", ("merge",), resources="merge")

STAGES = (SAMPLE, PLAN_TRAINING, TRAIN, PLAN_SELECTION, SELECT, PLAN_INFERENCE, INFER, MERGE)

#: The pod-setting inputs of a stage template, filled from prepare's ``resources.<stage>``.
POD_INPUTS = ("cpu", "memory", "gpu", "deadline", "node-selector", "tolerations")
#: The JSON field of prepare's ``resources.<stage>`` behind each pod input.
POD_FIELDS = {"node-selector": "node_selector"}


def _env(gpu: bool = False) -> list[Env | SecretEnv]:
    """The S3 endpoint (a workflow parameter) and credentials (an optional Secret: without it the
    pod's cloud identity is used); for GPU stages the GPUs the pod was given (``SITSFLOW_GPUS``,
    which makes a pod that got a GPU it cannot use fail instead of running on the CPU)."""
    env: list[Env | SecretEnv] = [Env(name="AWS_ENDPOINT_URL", value="{{workflow.parameters.s3-endpoint}}")]
    if gpu:
        env.append(Env(name="SITSFLOW_GPUS", value="{{inputs.parameters.gpu}}"))
    env += [
        SecretEnv(
            name=key,
            secret_name="{{workflow.parameters.s3-secret}}",
            secret_key=key,
            optional=True,
        )
        for key in S3_SECRET_KEYS
    ]
    return env


def _pod_spec_patch(stage: Stage | None) -> str:
    """The strategic-merge patch applying a template's pod inputs (Argo parameterises pods so).

    Kubernetes parses resource quantities and maps when the template is read, so parameterised
    requests, node selectors and tolerations must go through ``podSpecPatch`` (``main`` is the
    name Argo gives a template's container).
    """
    if stage is None or stage.resources is None:
        return (
            '{"nodeSelector": {{workflow.parameters.cpu-node-selector}}, '
            '"tolerations": {{workflow.parameters.cpu-tolerations}}}'
        )
    requests = {"cpu": "{{inputs.parameters.cpu}}", "memory": "{{inputs.parameters.memory}}"}
    limits = {"memory": "{{inputs.parameters.memory}}"}
    if stage.gpu:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = "{{inputs.parameters.gpu}}"
    container = {"name": "main", "resources": {"requests": requests, "limits": limits}}
    return (
        f'{{"containers": [{json.dumps(container)}], '
        '"nodeSelector": {{inputs.parameters.node-selector}}, '
        '"tolerations": {{inputs.parameters.tolerations}}}'
    )


def _default_resources(stage: Stage | None) -> models.ResourceRequirements:
    """The container's plain resources: the built-in defaults (the patch replaces them)."""
    if stage is None or stage.resources is None:
        requests, limits = dict(SMALL_REQUESTS), {"memory": "1Gi"}
    else:
        builtin = BUILTIN[stage.resources]
        requests = {"cpu": str(builtin["nb_cpu"]), "memory": str(builtin["ram"])}
        limits = {"memory": str(builtin["ram"])}
        if stage.gpu:
            requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(builtin["nb_gpu"])
    return models.ResourceRequirements(
        requests={k: models.Quantity(v) for k, v in requests.items()},
        limits={k: models.Quantity(v) for k, v in limits.items()},
    )


def _container(name: str, args: list[str], inputs: list[Parameter], stage: Stage | None = None) -> Container:
    """A ``sitsflow`` container template: the one place every template's settings are made."""
    gpu = stage is not None and stage.gpu
    return Container(
        name=name,
        image="{{workflow.parameters.gpu-image}}" if gpu else "{{workflow.parameters.image}}",
        image_pull_policy="IfNotPresent",
        command=["sitsflow"],
        args=args,
        inputs=inputs or None,
        env=_env(gpu),
        security_context=CONTAINER_SECURITY,
        resources=_default_resources(stage),
        pod_spec_patch=_pod_spec_patch(stage),
        active_deadline_seconds=("{{inputs.parameters.deadline}}" if stage is not None and stage.resources else None),
        # A failed pod's last log lines (sitsflow's error, naming the stage) become its message.
        termination_message_policy="FallbackToLogsOnError",
        retry_strategy=_retry_strategy(),
        volumes=[EmptyDirVolume(name="dshm", mount_path="/dev/shm", medium="Memory")] if gpu else None,
    )


def _stage_container(stage: Stage) -> Container:
    """The container of a stage that reads the resolved configuration (input ``config``)."""
    args = [*stage.subcommand, "--config", "{{inputs.parameters.config}}"]
    inputs = [Parameter(name="config")]
    if stage.plan is not None:
        args += ["--shard", "{{inputs.parameters.shard}}"]
        inputs.append(Parameter(name="shard"))
    if stage.subcommand[0] == "plan":
        args += ["--max-shards", "{{workflow.parameters.max-shards}}"]
    if stage.resources is not None:
        inputs += [Parameter(name=key) for key in POD_INPUTS if key != "gpu" or stage.gpu]
    return _container(stage.name, args, inputs, stage)


def _prepare_container() -> Container:
    """``prepare``: resolve the configuration and its overrides; stdout is prepare's JSON."""
    args = [
        "prepare",
        "--config",
        "{{workflow.parameters.config}}",
        "--overrides",
        "{{workflow.parameters.overrides}}",
        "--output-path",
        "{{workflow.parameters.output-path}}",
        "--pool-label",
        "{{workflow.parameters.pool-label}}",
        "--gpu-node-selector",
        "{{workflow.parameters.gpu-node-selector}}",
        "--cpu-node-selector",
        "{{workflow.parameters.cpu-node-selector}}",
        "--gpu-tolerations",
        "{{workflow.parameters.gpu-tolerations}}",
        "--cpu-tolerations",
        "{{workflow.parameters.cpu-tolerations}}",
    ]
    return _container("prepare", args, [])


def _pod_argument(stage: Stage, key: str) -> str:
    """``{{=jsonpath(tasks.prepare.outputs.result, '$.resources.train.cpu')}}``."""
    field = POD_FIELDS.get(key, key)
    return f"{{{{=jsonpath({PREPARED}, '$.resources.{stage.resources}.{field}')}}}}"


def plan_field(plan: str, field: str) -> str:
    """``{{=jsonpath(tasks['plan-inference'].outputs.result, '$.shards')}}``: one field of a plan
    step's JSON (the task's name has a ``-``, so Argo's expression reads it by index)."""
    return f"{{{{=jsonpath(tasks['{plan}'].outputs.result, '$.{field}')}}}}"


def _task(stage: Stage, templates: dict[str, Container]) -> Task:
    """The DAG task of a stage: config and pod settings from ``prepare``; for a fan-out stage one
    task per shard of its plan (``withSequence``), the shard's deadline from the plan step."""
    arguments = {"config": RESOLVED_CONFIG}
    if stage.resources is not None:
        arguments.update({key: _pod_argument(stage, key) for key in POD_INPUTS if key != "gpu" or stage.gpu})
    sequence = None
    if stage.plan is not None:
        arguments["shard"] = "{{item}}"
        arguments["deadline"] = plan_field(stage.plan, "deadline")
        sequence = models.Sequence(count=models.IntOrString(plan_field(stage.plan, "shards")))
    return Task(
        name=stage.name,
        template=templates[stage.name],
        arguments=arguments,
        with_sequence=sequence,
    )


def _parameters() -> list[Parameter]:
    """The workflow parameters, with their defaults (``argo submit -p name=value``)."""

    def param(name: str, description: str, value: str | None = None) -> Parameter:
        if value is None:  # required: no default
            return Parameter(name=name, description=description)
        return Parameter(name=name, value=value, description=description)

    return [
        param("config", "URI (local path or s3://bucket/key) of the iota2 .cfg file"),
        param(
            "output-path",
            "where the run writes (local path or s3://bucket/prefix; replaces the .cfg's "
            "chain.output_path); also the key of the run's mutex: two workflows with the same "
            "output-path never run at once. Empty: the .cfg's output path, and the run queues "
            "behind every other run that leaves output-path empty",
            "",
        ),
        param(
            "overrides",
            'JSON list of "section.key=value" strings applied to the configuration',
            "[]",
        ),
        param(
            "image",
            "sitsflow image of the CPU steps (the Dockerfile's cpu target)",
            DEFAULT_IMAGE,
        ),
        param(
            "gpu-image",
            "sitsflow image of train and infer (the Dockerfile's gpu target)",
            DEFAULT_GPU_IMAGE,
        ),
        param("s3-endpoint", "S3 endpoint URL (AWS_ENDPOINT_URL); empty for AWS's default", ""),
        param(
            "s3-secret",
            "Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY keys",
            DEFAULT_S3_SECRET,
        ),
        param(
            "gpu-node-selector",
            "JSON node selector of the GPU stages (train, infer); {} lets the nvidia.com/gpu "
            'request alone choose (GKE: {"cloud.google.com/gke-accelerator": "nvidia-l4"})',
            "{}",
        ),
        param(
            "gpu-tolerations",
            "JSON list of tolerations of the GPU stages (the usual taint of GPU nodes by default)",
            json.dumps(GPU_TOLERATIONS),
        ),
        param("cpu-node-selector", "JSON node selector of every other step", "{}"),
        param("cpu-tolerations", "JSON list of tolerations of every other step", "[]"),
        param(
            "pool-label",
            "node label that a resource block's queue selects (GKE: "
            "cloud.google.com/gke-nodepool, EKS: eks.amazonaws.com/nodegroup, AKS: "
            "kubernetes.azure.com/agentpool); empty: queue is refused",
            "",
        ),
        param(
            "max-shards",
            "most tasks of each fan-out (train, select, infer): a larger plan is cut into this many "
            "shards of consecutive tasks, each run by one pod",
            str(MAX_SHARDS),
        ),
        param(
            "retry-limit",
            "retries of a step after a transient failure (exit 75, pod deleted, evicted or "
            "preempted, node shutdown); never exit 2 nor a deadline exceeded",
            RETRY_LIMIT,
        ),
        param(
            "retry-backoff",
            "delay before the first retry (a Go duration), doubled at each retry",
            RETRY_BACKOFF,
        ),
        param(
            "retry-backoff-cap",
            "longest delay before a retry (a Go duration; backoff.cap, Argo >= 3.7)",
            RETRY_BACKOFF_CAP,
        ),
    ]


def _retry_strategy() -> models.RetryStrategy:
    return models.RetryStrategy(
        limit=models.IntOrString("{{workflow.parameters.retry-limit}}"),
        retry_policy="Always",
        expression=RETRY_EXPRESSION,
        backoff=models.Backoff(
            duration="{{workflow.parameters.retry-backoff}}",
            factor=models.IntOrString(RETRY_FACTOR),
            cap="{{workflow.parameters.retry-backoff-cap}}",
        ),
    )


def build() -> WorkflowTemplate:
    """Build the ``sitsflow`` WorkflowTemplate (entrypoint: the DAG ``pipeline``)."""
    with WorkflowTemplate(
        name=NAME,
        entrypoint=ENTRYPOINT,
        arguments=_parameters(),
        parallelism=PARALLELISM,
        active_deadline_seconds=WORKFLOW_DEADLINE,
        synchronization=models.Synchronization(mutexes=[models.Mutex(name=RUN_MUTEX)]),
        pod_gc=models.PodGC(strategy="OnPodSuccess"),
        ttl_strategy=models.TTLStrategy(seconds_after_success=7 * 86400, seconds_after_failure=14 * 86400),
        security_context=models.PodSecurityContext(
            run_as_non_root=True,
            run_as_user=10001,
            run_as_group=10001,
            fs_group=10001,
            seccomp_profile=models.SeccompProfile(type="RuntimeDefault"),
        ),
    ) as template:
        templates = {"prepare": _prepare_container()}
        templates.update({stage.name: _stage_container(stage) for stage in STAGES})

        with DAG(name=ENTRYPOINT):
            prepare = Task(name="prepare", template=templates["prepare"])
            sample = _task(SAMPLE, templates)
            plan_training = _task(PLAN_TRAINING, templates)
            train = _task(TRAIN, templates)
            plan_selection = _task(PLAN_SELECTION, templates)
            select = _task(SELECT, templates)
            plan_inference = _task(PLAN_INFERENCE, templates)
            infer = _task(INFER, templates)
            merge = _task(MERGE, templates)

            prepare >> [sample, plan_inference]
            sample >> [plan_training, plan_selection]
            plan_training >> train
            [train, plan_selection] >> select  # type: ignore[operator]  # Task.__rrshift__
            [select, plan_inference] >> infer  # type: ignore[operator]
            infer >> merge
    # Hera fills these from its process-wide global_config when None; the template names neither
    # (the namespace is where it is installed, the service account is the chart's choice).
    template.namespace = None
    template.service_account_name = None
    return template


def render() -> str:
    """The YAML of :func:`build`, as committed in :data:`YAML_PATH`."""
    return HEADER + build().to_yaml()


def main(argv: list[str] | None = None) -> int:
    """Write the rendered YAML to :data:`YAML_PATH` and the chart's copy (or to the one
    path given)."""
    argv = sys.argv[1:] if argv is None else argv
    paths = [Path(argv[0])] if argv else [YAML_PATH, CHART_COPY]
    text = render()
    for path in paths:
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
