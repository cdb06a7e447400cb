"""Fan-out by shards: a plan is stored, and each fan-out task runs one shard of it.

``sitsflow plan <stage>`` stores the full task list of a fan-out (:func:`sitsflow.planning`'s
``PLANS``) at ``<output_path>/plans/<stage>.json`` (one atomic write, a deterministic key) and
prints only a small JSON summary, whatever the size of the plan: Argo keeps 256 KiB of a step's
``outputs.result`` and copies a ``withParam`` list into every task it expands, so a national run
(2,000 tiles × 50 chunks × 5 runs = 500,000 inference tasks, ~22 MB of JSON) could not pass
through stdout. The WorkflowTemplate fans out with ``withSequence`` over the shard numbers
``0 .. shards-1``; ``sitsflow train|select|infer --shard K`` reads the plan and runs the tasks of
shard K one after the other, each skipped when its manifest says it is done (a retried shard
resumes where it stopped).
"""

from __future__ import annotations

import json

from sitsflow.errors import BadInputError

#: Default bound on the shards of one fan-out (the workflow parameter ``max-shards``). A plan of
#: up to this many tasks runs one task per shard, as a fan-out over the items would; a larger one
#: is cut into exactly this many shards of consecutive tasks. Each shard is one Argo task (two
#: workflow nodes: the retry node and its pod, more when retried), so the three fan-outs stay near
#: 3 × 2 × 100 nodes whatever the size of the run, while 100 shards keep more pods ready than the
#: workflow's default ``parallelism`` (20) runs at once.
MAX_SHARDS = 100
#: The stage whose resource block (``walltime``) applies to each plan's fan-out.
PLAN_STAGES = {"training": "train", "selection": "select", "inference": "infer"}


def shard_count(items: int, max_shards: int = MAX_SHARDS) -> int:
    """The shards of a plan of ``items`` tasks: one per task up to ``max_shards``, and at least one
    (an empty plan still has shard 0, with nothing to do: no orchestrator sees an empty fan-out).

    Raises:
        BadInputError: ``max_shards`` below 1.
    """
    if max_shards < 1:
        raise BadInputError(f"--max-shards must be at least 1, got {max_shards}")
    return max(1, min(items, max_shards))


def shard_range(items: int, shards: int, shard: int) -> range:
    """The plan indices of shard ``shard`` (0-based) of ``shards``: consecutive tasks, the sizes
    differing by at most one; the shards partition ``range(items)``.

    Raises:
        BadInputError: the plan has no shard ``shard``.
    """
    if not 0 <= shard < shards:
        raise BadInputError(f"--shard {shard}: the plan has {shards} shard(s), numbered 0..{shards - 1}")
    return range(shard * items // shards, (shard + 1) * items // shards)


def largest_shard(items: int, shards: int) -> int:
    """Tasks of the largest shard (``ceil(items / shards)``)."""
    return -(-items // shards)


def write_plan(cfg, stage: str, items: list[dict], max_shards: int = MAX_SHARDS) -> dict:
    """Store the plan of ``stage`` and return what the plan step prints (small whatever the
    plan's size).

    ``shards`` and ``deadline`` are strings, as Argo substitutes them (``withSequence.count``, and
    the fan-out pods' ``activeDeadlineSeconds``): a shard's deadline is the stage's iota2
    ``walltime`` (a limit per task) times the tasks of the largest shard.
    """
    from sitsflow import layout, storage
    from sitsflow.config.resources import stage_pods

    shards = shard_count(len(items), max_shards)
    uri = layout.plan(cfg.chain.output_path, stage)
    doc = {"stage": stage, "shards": shards, "items": items}
    storage.write_text(uri, json.dumps(doc, separators=(",", ":")))
    walltime = int(stage_pods(cfg.resources)[PLAN_STAGES[stage]]["deadline"])
    per_shard = largest_shard(len(items), shards)
    return {
        "plan": uri,
        "items": len(items),
        "shards": str(shards),
        "per_shard": per_shard,
        "deadline": str(walltime * max(1, per_shard)),
    }


def read_shard(cfg, stage: str, shard: int) -> list[dict]:
    """The tasks of one shard of the stored plan of ``stage``.

    Raises:
        BadInputError: no stored plan (run ``sitsflow plan <stage>`` first), a file that is not a
            sitsflow plan of that stage, or a shard the plan does not have.
    """
    from sitsflow import layout, storage

    uri = layout.plan(cfg.chain.output_path, stage)
    if not storage.exists(uri):
        raise BadInputError(f"no {stage} plan at {uri}: run `sitsflow plan {stage}` first")
    try:
        doc = json.loads(storage.read_text(uri))
        items, shards = doc["items"], int(doc["shards"])
        if doc.get("stage") != stage or not isinstance(items, list):
            raise ValueError(f"not a {stage} plan")
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{uri} is not a sitsflow {stage} plan ({exc}): rerun `sitsflow plan {stage}`") from None
    return [items[i] for i in shard_range(len(items), shards, shard)]


def count_tasks(results) -> tuple[int, int]:
    """``(done, skipped)`` stage tasks of a run, from its steps' stdout texts: a shard reports its
    counts, a single task ``{"skipped": bool}``; anything else (plans, prepare) counts nothing."""
    done = skipped = 0
    for text in results:
        try:
            doc = json.loads(text) if text else None
        except (TypeError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and "shard" in doc:
            done, skipped = done + int(doc["done"]), skipped + int(doc["skipped"])
        elif isinstance(doc, dict) and "skipped" in doc:
            done, skipped = done + (not doc["skipped"]), skipped + bool(doc["skipped"])
    return done, skipped
