"""iota2's per-step resource blocks, and what each pipeline stage's pods request on Kubernetes.

iota2 users describe a step's PBS resources as a block::

    training : { name:"training" nb_cpu:10 ram:"92gb" walltime:"12:00:00" nb_gpu:1 queue:"qgpgpu" }

sitsflow reads the same blocks from a ``resources`` section of the configuration, one block per
stage (``sample``, ``train``, ``select``, ``infer``, ``merge``) plus ``default`` for every stage::

    resources : {
        default : { nb_cpu : 2  ram : "8gb" }
        train : { name:"training" nb_cpu:10 ram:"92gb" walltime:"12:00:00" nb_gpu:1 queue:"qgpgpu" }
    }

and ``sitsflow prepare`` turns them into each stage's pod settings (:func:`stage_pods`), which the
WorkflowTemplate applies: ``nb_cpu`` → CPU request, ``ram`` → memory request and limit,
``walltime`` → ``activeDeadlineSeconds``, ``nb_gpu`` → ``nvidia.com/gpu`` (train and infer only),
``queue`` → a node selector ``{<pool label>: <queue>}`` on top of the stage's default selector.
``name`` is iota2's PBS job name: checked, kept in the resolved configuration, and otherwise
unused (Argo names the pods after the tasks).

iota2's own spelling is accepted as written: a block named after an iota2 step (``training``,
``classifications``, ``mosaic``, ... :data:`IOTA2_STEPS`), inside ``resources`` or at the top
level of the configuration (where iota2's resource file has them), is the block of the sitsflow
stage that does that step's work. Several iota2 steps done by one stage (``samplesSelection``
and ``samplesExtraction`` are both ``sample``) give that stage, key by key, the largest of their
requests (``name`` and ``queue`` from the first one). A stage given both under its own name and
an iota2 step name is refused (exit 2), naming both.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from sitsflow.config.schema import Expect, Inline, Section, Text
from sitsflow.config.schema import expected as expected_text

#: The stages whose pods request GPUs (and go to GPU nodes); the others run on CPU nodes.
GPU_STAGES: tuple[str, ...] = ("train", "infer")
#: GPUs one train or infer pod can use (multi-GPU is not implemented: ``nb_gpu`` above is refused).
MAX_GPUS = 1
#: Every stage a block can name, in pipeline order.
STAGES: tuple[str, ...] = ("sample", "train", "select", "infer", "merge")

#: Built-in pod settings of each stage, before the ``default`` and the stage's own block.
BUILTIN: dict[str, dict[str, Any]] = {
    "sample": {"nb_cpu": 2, "ram": "8Gi", "walltime": 86400, "nb_gpu": 0, "queue": None},
    "train": {"nb_cpu": 4, "ram": "16Gi", "walltime": 86400, "nb_gpu": 1, "queue": None},
    "select": {"nb_cpu": 1, "ram": "4Gi", "walltime": 21600, "nb_gpu": 0, "queue": None},
    "infer": {"nb_cpu": 4, "ram": "16Gi", "walltime": 86400, "nb_gpu": 1, "queue": None},
    "merge": {"nb_cpu": 2, "ram": "8Gi", "walltime": 43200, "nb_gpu": 0, "queue": None},
}

#: iota2 step names accepted as resource blocks, with the sitsflow stage doing that step's work.
IOTA2_STEPS: dict[str, str] = {
    "training": "train",
    "classifications": "infer",
    "cmdClassifications": "infer",
    "mosaic": "merge",
    "vectorSampler": "sample",
    "samplesExtraction": "sample",
    "samplesSelection": "sample",
}
#: iota2 block names that are refused, with what to write instead.
IOTA2_STEP_HINTS: dict[str, str] = {
    "iota2_chain": "the whole chain is an Argo workflow; name a stage or default",
}

_PBS_RAM = re.compile(r"(\d+)\s*([kmgtp]?)b", re.IGNORECASE)
_K8S_RAM = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
_QUEUE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")


_RAM_TEXT = 'a memory size such as "92gb" (PBS, binary units) or "16Gi" (Kubernetes)'
_WALLTIME_TEXT = 'a walltime "HH:MM:SS" (hours may exceed 24) or a number of seconds'


def parse_ram(value: Any) -> str:
    """iota2/PBS memory (``"92gb"``, ``"512mb"``) or a Kubernetes quantity → a quantity string.

    PBS units are binary (1 gb = 1024³ bytes), so ``"92gb"`` is ``"92Gi"``; Kubernetes forms pass
    through (``"16Gi"``, ``"500M"``, ``"4G"``); a bare number is bytes. Raises ValueError.
    """
    expected = _RAM_TEXT
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(expected)
    text = str(value).strip()
    if match := _PBS_RAM.fullmatch(text):
        amount, unit = match.group(1), match.group(2).lower()
        quantity = amount + {"": "", "k": "Ki", "m": "Mi", "g": "Gi", "t": "Ti", "p": "Pi"}[unit]
    elif match := _K8S_RAM.fullmatch(text):
        amount, quantity = match.group(1), text
    else:
        raise ValueError(expected)
    if float(amount) <= 0:
        raise ValueError(expected + "; it must be more than 0")
    return quantity


def parse_walltime(value: Any) -> int:
    """PBS walltime ``[[hours:]minutes:]seconds`` (``"12:00:00"``) or seconds → seconds (> 0)."""
    expected = _WALLTIME_TEXT
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(?::\d{1,2}){0,2}\s*", value):
        parts = [int(p) for p in value.strip().split(":")]
        if any(p >= 60 for p in parts[1:]):
            raise ValueError(expected + "; minutes and seconds must be below 60")
        seconds = 0
        for part in parts:
            seconds = seconds * 60 + part
    else:
        raise ValueError(expected)
    if seconds <= 0:
        raise ValueError(expected + "; it must be more than 0 seconds")
    return seconds


def _ram_bytes(text: str) -> float:
    """Bytes of a quantity returned by :func:`parse_ram` (to compare two of them)."""
    match = _K8S_RAM.fullmatch(text)
    assert match is not None
    factor = {
        None: 1,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
    }[match.group(2)]
    return float(match.group(1)) * factor


_LARGEST = {
    "nb_cpu": lambda v: v,
    "nb_gpu": lambda v: v,
    "ram": lambda v: _ram_bytes(parse_ram(v)),
    "walltime": parse_walltime,
}


def _merged(blocks: list[Any]) -> Any:
    """One block from several iota2 step blocks of one stage: the largest request of each key."""
    if len(blocks) == 1 or not all(isinstance(b, dict) for b in blocks):
        return blocks[0]
    out: dict[str, Any] = {}
    for block in blocks:
        for key, value in block.items():
            if key not in out:
                out[key] = value
            elif key in _LARGEST:
                try:
                    if _LARGEST[key](value) > _LARGEST[key](out[key]):
                        out[key] = value
                except (TypeError, ValueError):
                    out[key] = value  # a bad value is reported by validation
    return out


def iota2_blocks(data: Any) -> Any:
    """``data`` (the raw ``resources`` dict) with iota2 step blocks renamed to their stages."""
    if not isinstance(data, dict) or not any(k in IOTA2_STEPS for k in data):
        return data
    out = {k: v for k, v in data.items() if k not in IOTA2_STEPS}
    by_stage: dict[str, list[str]] = {}
    for key in data:
        if key in IOTA2_STEPS:
            by_stage.setdefault(IOTA2_STEPS[key], []).append(key)
    for stage, steps in by_stage.items():
        if stage in out:
            raise expected_text(
                f"one block per stage: the {stage} stage is given both as resources.{stage} and as iota2's "
                f"{' and '.join(steps)}; keep one"
            )
        out[stage] = _merged([data[k] for k in steps])
    return out


def _parsed(parse: Any) -> Any:
    """A validator from a ``parse_*`` function (its ValueError says what is expected)."""

    def check(value: Any) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise expected_text(str(exc)) from None

    return BeforeValidator(check)


class StageResources(Inline):
    """One iota2 resource block; a key left out keeps the default (``default`` block, built-in)."""

    name: Annotated[str, Text("a non-empty string (iota2's job name)")] | None = None
    """iota2's PBS job name; kept for compatibility, Argo names the pods after the tasks."""
    nb_cpu: Annotated[int, Field(ge=1)] | None = None
    """CPU cores requested (``resources.requests.cpu``)."""
    ram: Annotated[str, _parsed(parse_ram), Expect(_RAM_TEXT)] | None = None
    """Memory requested and limited (``resources.requests/limits.memory``): a PBS size
    (``"92gb"``, binary units: 92Gi) or a Kubernetes quantity (``"16Gi"``, ``"500M"``)."""
    walltime: Annotated[int, _parsed(parse_walltime), Expect(_WALLTIME_TEXT)] | None = None
    """Seconds a pod may run (``activeDeadlineSeconds``) before Argo stops it."""
    nb_gpu: (
        Annotated[
            int,
            Field(ge=0, le=MAX_GPUS),
            Expect(
                f"0 or {MAX_GPUS} (a step uses one GPU at most: multi-GPU training and inference are not "
                "implemented; more inference chunks spread a run over more GPUs)"
            ),
        ]
        | None
    ) = None
    """GPUs requested (``nvidia.com/gpu``); train and infer only; 0 makes a CPU pod on CPU nodes."""
    queue: (
        Annotated[
            str,
            Text(
                "a node pool name: a Kubernetes label value (letters, digits, '-', '_', '.', at most 63 characters)",
                _QUEUE.pattern,
            ),
        ]
        | None
    ) = None
    """Node pool: the pods get the node selector ``{<pool-label parameter>: queue}``."""


def _no_gpu(stage: str) -> Any:
    """The rule that ``stage`` (a CPU stage) requests no GPU."""

    def check(resources: ResourcesSection) -> Any:
        block = getattr(resources, stage)
        if block is not None and block.nb_gpu:
            yield (
                (stage, "nb_gpu"),
                block.nb_gpu,
                expected_text(f"0 ({stage} runs on CPU nodes; only {' and '.join(GPU_STAGES)} take GPUs)"),
            )

    return ((stage,), check)


class ResourcesSection(Section):
    """The ``resources`` section: iota2's per-step resource blocks, one per stage.

    They set what each stage's pods request on Kubernetes (``docs/deploy.md``, "iota2 resource
    blocks"). A stage's block wins over ``default`` key by key; a key left out keeps the built-in
    setting (:data:`BUILTIN`). iota2 step names (``training``, ``classifications``, ``mosaic``,
    ...) are read as the block of the stage doing that step (:data:`IOTA2_STEPS`).
    """

    __refused__ = IOTA2_STEP_HINTS  # refused even empty: a block names where resources go
    __rules__ = tuple(_no_gpu(stage) for stage in STAGES if stage not in GPU_STAGES)

    default: StageResources | None = None
    """Applies to every stage (its nb_gpu to train and infer only); a stage's block wins."""
    sample: StageResources | None = None
    """Sampling pods (CPU nodes)."""
    train: StageResources | None = None
    """Training pods, one per (region, seed, hyperparameter pair) (GPU nodes)."""
    select: StageResources | None = None
    """Selection pods, one per (region, seed) (CPU nodes)."""
    infer: StageResources | None = None
    """Inference pods, one per (tile, chunk, seed) (GPU nodes)."""
    merge: StageResources | None = None
    """Merging pod (CPU nodes)."""

    @model_validator(mode="before")
    @classmethod
    def _iota2_steps(cls, data: Any) -> Any:
        return iota2_blocks(data)


def label_selector(text: str, what: str) -> dict[str, str]:
    """A JSON object of Kubernetes node labels (``{"key": "value"}``), checked.

    Raises:
        ValueError: not a JSON object of strings, or a key/value Kubernetes would refuse.
    """
    try:
        selector = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: expected a JSON object of node labels, got {text!r} ({exc})") from None
    if not isinstance(selector, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
    ):
        raise ValueError(f"{what}: expected a JSON object of string labels, got {text!r}")
    for key, value in selector.items():
        check_label_key(key, what)
        if value and not _LABEL_NAME.match(value):
            raise ValueError(f"{what}: label value {value!r} is not a valid Kubernetes label value")
    return selector


def check_label_key(key: str, what: str) -> str:
    """A Kubernetes label key (``[prefix/]name``); raises ValueError naming ``what``."""
    prefix, _, name = key.rpartition("/")
    if not _LABEL_NAME.match(name) or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
        raise ValueError(
            f"{what}: {key!r} is not a Kubernetes label key ([dns-prefix/]name, name made of "
            "letters, digits, '-', '_', '.', at most 63 characters)"
        )
    return key


def tolerations_list(text: str, what: str) -> list[dict[str, Any]]:
    """A JSON list of Kubernetes tolerations (objects), checked loosely (the API server checks
    the fields).

    Raises:
        ValueError: not a JSON list of objects, naming ``what``.
    """
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: expected a JSON list of tolerations, got {text!r} ({exc})") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"{what}: expected a JSON list of toleration objects, got {text!r}")
    return value


def stage_pods(
    resources: ResourcesSection,
    *,
    pool_label: str = "",
    gpu_node_selector: str = "{}",
    cpu_node_selector: str = "{}",
    gpu_tolerations: str = "[]",
    cpu_tolerations: str = "[]",
) -> dict[str, dict[str, str]]:
    """Each stage's pod settings, as the WorkflowTemplate reads them from ``prepare``'s output.

    Built-in defaults (:data:`BUILTIN`) ← the ``default`` block ← the stage's block. Returns
    ``{stage: {"cpu": "10", "memory": "92Gi", "gpu": "1", "deadline": "43200",
    "node_selector": '{"pool": "qgpgpu"}', "tolerations": "[...]"}}``, every value a string
    (Argo parameters are strings; ``node_selector`` and ``tolerations`` are JSON text). ``gpu``
    is "0" for CPU stages. A pod with GPUs gets the GPU node selector and tolerations; every other
    pod (CPU stages, and train or infer with ``nb_gpu : 0``) the CPU ones. A block's ``queue`` adds
    ``{pool_label: queue}`` to that selector.

    Raises:
        ValueError: a selector or the pool label is malformed, or a queue is set while
            ``pool_label`` is empty (the message names the block).
    """
    gpu_selector = label_selector(gpu_node_selector, "gpu-node-selector")
    cpu_selector = label_selector(cpu_node_selector, "cpu-node-selector")
    gpu_toleration = tolerations_list(gpu_tolerations, "gpu-tolerations")
    cpu_toleration = tolerations_list(cpu_tolerations, "cpu-tolerations")
    if pool_label:
        check_label_key(pool_label, "pool-label")
    default = resources.default.model_dump(exclude_none=True) if resources.default else {}
    pods: dict[str, dict[str, str]] = {}
    for stage in STAGES:
        block = getattr(resources, stage)
        settings = {**BUILTIN[stage], **default, **(block.model_dump(exclude_none=True) if block else {})}
        gpu = stage in GPU_STAGES and settings["nb_gpu"] > 0
        selector = dict(gpu_selector if gpu else cpu_selector)
        queue = settings.get("queue")
        if queue:
            if not pool_label:
                origin = stage if block is not None and block.queue else "default"
                raise ValueError(
                    f"resources.{origin}.queue is {queue!r} but the workflow parameter pool-label "
                    "is empty: set it to the node label naming node pools (GKE: "
                    "cloud.google.com/gke-nodepool, EKS: eks.amazonaws.com/nodegroup, AKS: "
                    "kubernetes.azure.com/agentpool)"
                )
            selector[pool_label] = queue
        pods[stage] = {
            "cpu": str(settings["nb_cpu"]),
            "memory": str(settings["ram"]),
            "gpu": str(settings["nb_gpu"]) if gpu else "0",
            "deadline": str(settings["walltime"]),
            "node_selector": json.dumps(selector, sort_keys=True, separators=(",", ":")),
            "tolerations": json.dumps(gpu_toleration if gpu else cpu_toleration, separators=(",", ":")),
        }
    return pods
