"""The ``sitsflow`` command line: one subcommand per stage, plus planning and the local runner.

Logs go to stderr; stdout carries only what an orchestrator reads (JSON, or the resolved
configuration's URI for ``prepare``). Exit codes: 0 done, 2 bad input (never retried),
75 transient infrastructure trouble (retried), 1 a bug (an unexpected exception: its traceback and
a request to report it on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from sitsflow import __version__
from sitsflow.errors import EXIT_BUG, BadInputError, ConfigError, SitsflowError
from sitsflow.log import get_logger, setup_logging
from sitsflow.process import Stopped, stop_on_sigterm
from sitsflow.shards import MAX_SHARDS

log = get_logger("sitsflow.cli")


def _add_config(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="iota2 configuration file (.cfg), local path or s3:// URI")
    else:
        p.add_argument("--config", required=True, help="configuration file (.cfg), local path or s3:// URI")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a configuration value (repeatable), e.g. --set chain.output_path=s3://bucket/run1",
    )


def _add_shard(p: argparse.ArgumentParser, plan: str) -> None:
    p.add_argument(
        "--shard",
        type=int,
        default=None,
        metavar="K",
        help=f"run every task of shard K of the stored {plan} plan (`sitsflow plan {plan}`) instead of one "
        "task; tasks already done are skipped",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sitsflow",
        description="iota2's deep-learning workflow, cloud-native: sampling, training, selection, inference, merging.",
    )
    parser.add_argument("--version", action="version", version=f"sitsflow {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "prepare", help="validate the configuration and write the resolved one next to the outputs; prints its URI"
    )
    _add_config(p)
    p.add_argument(
        "--overrides",
        default="[]",
        help='JSON list of "section.key=value" overrides (the WorkflowTemplate\'s parameter)',
    )
    p.add_argument(
        "--pool-label",
        default="",
        help="node label that resource blocks' queue selects (e.g. cloud.google.com/gke-nodepool)",
    )
    p.add_argument("--gpu-node-selector", default="{}", help="JSON node selector of the GPU stages (train, infer)")
    p.add_argument(
        "--cpu-node-selector", default="{}", help="JSON node selector of the CPU stages (sample, select, merge)"
    )
    p.add_argument("--gpu-tolerations", default="[]", help="JSON tolerations of pods with GPUs")
    p.add_argument("--cpu-tolerations", default="[]", help="JSON tolerations of every other pod")
    p.add_argument(
        "--output-path", default="", help="the run's output path (replaces chain.output_path; empty: the .cfg's)"
    )

    p = sub.add_parser("sample", help="sampling stage: extract labelled pixels into the NetCDF sample databases")
    _add_config(p)

    p = sub.add_parser("plan", help="store the task list a stage fans out over; print its size and shard count (JSON)")
    p.add_argument("stage", choices=["training", "selection", "inference"])
    _add_config(p)
    p.add_argument(
        "--max-shards",
        type=int,
        default=MAX_SHARDS,
        help=f"most shards (fan-out tasks) the plan is cut into (default {MAX_SHARDS}; one item per shard below it)",
    )

    p = sub.add_parser(
        "train", help="training stage: train one (region, seed, hyperparameter pair), or one shard of the plan"
    )
    _add_config(p)
    p.add_argument("--region", type=int)
    p.add_argument("--seed", type=int, help="run number (0 .. arg_train.runs-1)")
    p.add_argument("--hyp", type=int, help="hyperparameter pair number (see the README)")
    _add_shard(p, "training")

    p = sub.add_parser(
        "select", help="selection stage: pick the best candidate of one (region, seed), or of one shard of the plan"
    )
    _add_config(p)
    p.add_argument("--region", type=int)
    p.add_argument("--seed", type=int)
    _add_shard(p, "selection")

    p = sub.add_parser("infer", help="inference stage: classify one (tile, chunk, seed), or one shard of the plan")
    _add_config(p)
    p.add_argument("--tile")
    p.add_argument("--chunk", type=int)
    p.add_argument("--seed", type=int)
    _add_shard(p, "inference")

    p = sub.add_parser("merge", help="merging stage: chunks -> tile maps -> final COGs and RESULTS.txt")
    _add_config(p)

    p = sub.add_parser("run", help="run the whole pipeline on this machine (executes the rendered WorkflowTemplate)")
    _add_config(p, positional=True)
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="tasks run at a time")
    p.add_argument(
        "--workflow", default=None, help="rendered WorkflowTemplate YAML (default: the one shipped in the package)"
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress display")
    p.add_argument("--log-dir", default=None, help="folder for the per-task logs (default: a temporary folder)")
    p.add_argument(
        "--max-shards",
        type=int,
        default=MAX_SHARDS,
        help=f"most tasks of each fan-out (the workflow parameter max-shards; default {MAX_SHARDS})",
    )
    _add_cluster_commands(sub)
    return parser


def _add_cluster_commands(sub) -> None:
    """``submit``, ``status``, ``logs``: runs on a cluster through the Kubernetes API (sitsflow.submit)."""

    def cluster_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-n", "--namespace", default=None, help="namespace of the chart (default: the kubeconfig context's)"
        )
        p.add_argument(
            "--context", default=None, help="kubeconfig context (default: the current one; $KUBECONFIG names the file)"
        )

    def wait_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--timeout",
            type=float,
            default=None,
            metavar="SECONDS",
            help="stop waiting after this long (exit 75; the workflow goes on)",
        )
        p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS", help="seconds between status reads")
        p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress display")

    p = sub.add_parser(
        "submit", help="validate, upload and start a run on the cluster (an Argo Workflow from the WorkflowTemplate)"
    )
    _add_config(p, positional=True)
    cluster_options(p)
    p.add_argument("--template", default="sitsflow", help="WorkflowTemplate name (the chart's workflowTemplate.name)")
    p.add_argument("--name", default=None, help="Workflow name (default: sitsflow-<config>-<fingerprint>)")
    p.add_argument("--wait", action="store_true", help="follow the run to its end: exit 0 succeeded, 1 failed")
    wait_options(p)

    p = sub.add_parser("status", help="per-stage view of a submitted run; prints the JSON summary")
    p.add_argument("name", help="Workflow name (printed by submit)")
    cluster_options(p)
    p.add_argument("--wait", action="store_true", help="follow the run to its end (like submit --wait)")
    wait_options(p)

    p = sub.add_parser("logs", help="the logs of a submitted run's pods (on stderr)")
    p.add_argument("name", help="Workflow name")
    cluster_options(p)
    p.add_argument("--stage", default=None, help="only this stage's pods (a DAG task: sample, train, infer ...)")
    p.add_argument(
        "--tail", type=int, default=None, metavar="LINES", help="last LINES lines of each log (default: all)"
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.sets)
    raw = getattr(args, "overrides", "[]") or "[]"
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f'--overrides: expected a JSON list of "section.key=value" strings, got {raw!r} ({exc})'
        ) from None
    if not isinstance(extra, list) or not all(isinstance(s, str) for s in extra):
        raise ConfigError(f"--overrides: expected a JSON list of strings, got {raw!r}")
    output = getattr(args, "output_path", "")  # prepare's --output-path (the workflow's parameter)
    return extra + sets + ([f"chain.output_path={output}"] if output else [])


def _load(args: argparse.Namespace):
    from sitsflow.config import load_config

    return load_config(args.config, _overrides(args))


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cmd_prepare(args: argparse.Namespace) -> int:
    from sitsflow import layout, preflight, storage
    from sitsflow.config.resources import stage_pods

    cfg = _load(args)
    preflight.run(cfg)  # everything checkable without data, so these mistakes cost no sampling
    uri = layout.resolved_config(cfg.chain.output_path)
    text = cfg.to_cfg()
    if not storage.exists(uri) or storage.read_text(uri) != text:
        storage.write_text(uri, text)
    log.info("resolved configuration written to %s", uri)
    try:
        pods = stage_pods(
            cfg.resources,
            pool_label=args.pool_label,
            gpu_node_selector=args.gpu_node_selector,
            cpu_node_selector=args.cpu_node_selector,
            gpu_tolerations=args.gpu_tolerations,
            cpu_tolerations=args.cpu_tolerations,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _emit({"config": uri, "resources": pods})
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from sitsflow import sampling

    _emit(sampling.run(_load(args)))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from sitsflow.planning import PLANS
    from sitsflow.shards import shard_count, write_plan

    shard_count(0, args.max_shards)  # a bad bound exits 2 before the plan is computed
    cfg = _load(args)
    _emit(write_plan(cfg, args.stage, PLANS[args.stage](cfg), args.max_shards))
    return 0


def _run_items(args: argparse.Namespace, plan: str, keys: tuple[str, ...], run) -> None:
    """One task (``--region 1 --seed 0 ...``), or every task of ``--shard K`` of the stored plan
    (each skipped when its manifest says it is done; a rerun of the shard resumes)."""
    given = [key for key in keys if getattr(args, key) is not None]
    if args.shard is None:
        if missing := [f"--{key}" for key in keys if key not in given]:
            raise BadInputError(
                f"sitsflow {args.command}: give {' '.join(missing)} (one task) or --shard K (a shard of the plan)"
            )
        _emit(run(_load(args), *(getattr(args, key) for key in keys)))
        return
    if given:
        raise BadInputError(
            f"sitsflow {args.command}: --shard runs the tasks of the plan; do not also give --{given[0]}"
        )
    from sitsflow.shards import read_shard

    cfg = _load(args)
    items = read_shard(cfg, plan, args.shard)
    done = skipped = 0
    for number, item in enumerate(items, 1):
        log.info("shard %d: task %d/%d: %s", args.shard, number, len(items), json.dumps(item))
        result = run(cfg, *(item[key] for key in keys))
        skipped += bool(result.get("skipped"))
        done += not result.get("skipped")
    _emit({"stage": args.command, "shard": args.shard, "items": len(items), "done": done, "skipped": skipped})


def cmd_train(args: argparse.Namespace) -> int:
    from sitsflow import training

    _run_items(args, "training", ("region", "seed", "hyp"), training.run)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from sitsflow import selection

    _run_items(args, "selection", ("region", "seed"), selection.run)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from sitsflow.process import tune_for_inference

    tune_for_inference()  # before torch is imported
    from sitsflow import inference

    _run_items(args, "inference", ("tile", "chunk", "seed"), inference.run)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from sitsflow import merging

    _emit(merging.run(_load(args)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sitsflow import layout, preflight, storage
    from sitsflow.runner import default_workflow_path, output_lease, run_workflow
    from sitsflow.shards import count_tasks, shard_count

    shard_count(0, args.max_shards)  # a bad bound exits 2 before anything runs
    cfg = _load(args)  # validate before any work: a bad configuration exits 2 and writes nothing
    preflight.run(cfg)  # the checks prepare makes, before the first task starts
    # tasks run side by side: share the cores between them instead of oversubscribing
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, args.workers))))
    source = args.config if storage.is_s3(args.config) else str(Path(args.config).resolve())
    workflow = Path(args.workflow) if args.workflow else default_workflow_path()
    out = cfg.chain.output_path
    with output_lease(out):  # a second run on this output path is refused, naming this one
        result = run_workflow(
            workflow,
            {
                "config": source,
                "overrides": json.dumps(_overrides(args)),
                "output-path": out,
                "max-shards": str(args.max_shards),
            },
            workers=args.workers,
            progress=False if args.no_progress else None,
            log_dir=Path(args.log_dir) if args.log_dir else None,
        )
    done, skipped = count_tasks(
        text for task in result.get("tasks", {}).values() for text in task.get("results", []) or []
    )
    _emit(
        {
            "output_path": out,
            "results": layout.final_results(out),
            "duration_s": round(result.get("duration_s", 0.0), 1),
            "tasks": {name: len(t.get("results", []) or []) for name, t in result.get("tasks", {}).items()},
            "stage_tasks_done": done,
            "stage_tasks_skipped": skipped,
        }
    )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from sitsflow import submit

    run = submit.prepare_run(args.config, args.sets, args.name)  # before touching the cluster
    cluster = submit.Cluster(args.namespace, args.context)
    wf, created = submit.submit_run(cluster, run, args.template)
    name = wf["metadata"]["name"]
    if not args.wait:
        _emit(
            {
                "workflow": name,
                "namespace": cluster.namespace,
                "created": created,
                "output_path": run.output_path,
                "config": run.config_uri,
                "phase": submit.snapshot(wf).phase,
            }
        )
        return 0
    _emit_follow(submit, cluster, name, args, run.output_path)
    return 0


def _emit_follow(submit, cluster, name: str, args: argparse.Namespace, output_path: str | None) -> None:
    progress = False if args.no_progress else sys.stderr.isatty()
    _emit(
        submit.follow(
            cluster, name, output_path=output_path, timeout=args.timeout, interval=args.interval, progress=progress
        )
    )


def cmd_status(args: argparse.Namespace) -> int:
    from sitsflow import submit

    cluster = submit.Cluster(args.namespace, args.context)
    if args.wait:
        _emit_follow(submit, cluster, args.name, args, None)
        return 0
    _emit(submit.show_status(cluster, args.name))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from sitsflow import submit

    cluster = submit.Cluster(args.namespace, args.context)
    submit.show_logs(cluster, args.name, args.stage, args.tail)
    return 0


COMMANDS = {
    "prepare": cmd_prepare,
    "sample": cmd_sample,
    "plan": cmd_plan,
    "train": cmd_train,
    "select": cmd_select,
    "infer": cmd_infer,
    "merge": cmd_merge,
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "logs": cmd_logs,
}


def _stage_label(args: argparse.Namespace) -> str:
    """``train --region 1 --seed 0 --hyp 2``: the command and the item it works on."""
    words = [args.command] + ([args.stage] if args.command == "plan" else [])
    for key in ("tile", "chunk", "region", "seed", "hyp", "shard"):
        if getattr(args, key, None) is not None:
            words.append(f"--{key} {getattr(args, key)}")
    return " ".join(words)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sitsflow`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    stop_on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except Stopped as exc:  # SIGTERM: a clean stop, retried (exit 75)
        log.error("%s", exc)
        log.error("sitsflow %s failed (exit %d)", _stage_label(args), exc.exit_code)
        return exc.exit_code
    except SitsflowError as exc:
        # The last line of a failed pod's log becomes its termination message (the WorkflowTemplate
        # sets FallbackToLogsOnError), so it names the stage and its item.
        log.error("%s", exc)
        log.error("sitsflow %s failed (exit %d)", _stage_label(args), exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception as exc:  # every expected failure is a SitsflowError: anything else is a bug
        log.exception("unexpected error in `sitsflow %s`", _stage_label(args))
        log.error(
            "sitsflow %s failed (exit %d): %s: %s -- this is a bug in sitsflow %s, not a problem with your inputs; "
            "please report it with the traceback above",
            _stage_label(args),
            EXIT_BUG,
            type(exc).__name__,
            exc,
            __version__,
        )
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
