"""sitsflow: iota2's deep-learning workflow, rebuilt cloud-native.

Five stages (sampling, training, selection, inference, merging) exchange every byte through
object storage (or local disk) and are orchestrated by an Argo WorkflowTemplate, which the local
runner (``sitsflow run``) also executes.
"""

__version__ = "0.1.0"
STAGES = ("sampling", "training", "selection", "inference", "merging")
