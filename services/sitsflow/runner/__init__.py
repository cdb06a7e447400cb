"""The local executor of the rendered Argo WorkflowTemplate (``sitsflow run``).

The pipeline is defined once (``workflows/pipeline.py``), rendered into the package
(``sitsflow/workflows/sitsflow.yaml``); Argo runs that YAML on a cluster and
:func:`run_workflow` runs its DAG here, each container as a process. :func:`output_lease` keeps
two runs off one output path.
"""

from sitsflow.runner.execute import Interrupted, WorkflowFailed, container_argv, run_workflow
from sitsflow.runner.lease import output_lease
from sitsflow.runner.workflow import default_workflow_path, load_workflow

__all__ = [
    "Interrupted",
    "WorkflowFailed",
    "container_argv",
    "default_workflow_path",
    "load_workflow",
    "output_lease",
    "run_workflow",
]
