"""The local executor of the rendered Argo WorkflowTemplate (``sitsflow run``).

The pipeline is defined once (``workflows/pipeline.py`` → ``workflows/sitsflow.yaml``); Argo runs
that YAML on a cluster and :func:`run_workflow` runs the same YAML here, each container as a
subprocess. :mod:`sitsflow.runner.validate` checks such documents (semantic lint, strict schemas).
"""

from sitsflow.runner.document import dag_order, default_workflow_path, load_workflow
from sitsflow.runner.execute import WorkflowFailed, container_argv, run_workflow
from sitsflow.runner.validate import lint

__all__ = [
    "WorkflowFailed",
    "container_argv",
    "dag_order",
    "default_workflow_path",
    "lint",
    "load_workflow",
    "run_workflow",
]
