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
from sitsflow.errors import EXIT_BUG, ConfigError, SitsflowError
from sitsflow.log import get_logger, setup_logging
from sitsflow.process import Stopped, stop_on_sigterm

log = get_logger("sitsflow.cli")


def _add_config(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="iota2 configuration file (.cfg), local path or s3:// URI")
    else:
        p.add_argument("--config", required=True, help="configuration file (.cfg), local path or s3:// URI")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a configuration value (repeatable), e.g. --set chain.output_path=s3://bucket/run1",
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

    p = sub.add_parser("plan", help="print the JSON task list a stage fans out over")
    p.add_argument("stage", choices=["training", "selection", "inference"])
    _add_config(p)

    p = sub.add_parser("train", help="training stage: train one (region, seed, hyperparameter pair)")
    _add_config(p)
    p.add_argument("--region", type=int, required=True)
    p.add_argument("--seed", type=int, required=True, help="run number (0 .. arg_train.runs-1)")
    p.add_argument("--hyp", type=int, required=True, help="hyperparameter pair number (see the README)")

    p = sub.add_parser("select", help="selection stage: pick the best candidate of one (region, seed)")
    _add_config(p)
    p.add_argument("--region", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)

    p = sub.add_parser("infer", help="inference stage: classify one (tile, chunk, seed)")
    _add_config(p)
    p.add_argument("--tile", required=True)
    p.add_argument("--chunk", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)

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
        p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="stop waiting after this long (exit 75; the workflow goes on)")
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
            f"--overrides: expected a JSON list of \"section.key=value\" strings, got {raw!r} ({exc})"
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

    _emit(PLANS[args.stage](_load(args)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sitsflow import training

    _emit(training.run(_load(args), args.region, args.seed, args.hyp))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from sitsflow import selection

    _emit(selection.run(_load(args), args.region, args.seed))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from sitsflow.process import tune_for_inference

    tune_for_inference()  # before torch is imported
    from sitsflow import inference

    _emit(inference.run(_load(args), args.tile, args.chunk, args.seed))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from sitsflow import merging

    _emit(merging.run(_load(args)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sitsflow import layout, preflight, storage
    from sitsflow.runner import default_workflow_path, output_lease, run_workflow

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
            {"config": source, "overrides": json.dumps(_overrides(args)), "output-path": out},
            workers=args.workers,
            progress=False if args.no_progress else None,
            log_dir=Path(args.log_dir) if args.log_dir else None,
        )
    skipped = done = 0
    for task in result.get("tasks", {}).values():
        for text in task.get("results", []) or []:
            try:
                doc = json.loads(text) if text else None
            except (TypeError, json.JSONDecodeError):
                continue
            if isinstance(doc, dict) and "skipped" in doc:
                skipped += bool(doc["skipped"])
                done += not doc["skipped"]
    _emit({
        "output_path": out,
        "results": layout.final_results(out),
        "duration_s": round(result.get("duration_s", 0.0), 1),
        "tasks": {name: len(t.get("results", []) or []) for name, t in result.get("tasks", {}).items()},
        "stage_tasks_done": done,
        "stage_tasks_skipped": skipped,
    })
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from sitsflow import submit

    run = submit.prepare_run(args.config, args.sets, args.name)  # before touching the cluster
    cluster = submit.Cluster(args.namespace, args.context)
    wf, created = submit.submit_run(cluster, run, args.template)
    name = wf["metadata"]["name"]
    if not args.wait:
        _emit({"workflow": name, "namespace": cluster.namespace, "created": created, "output_path": run.output_path,
               "config": run.config_uri, "phase": submit.snapshot(wf).phase})
        return 0
    _emit_follow(submit, cluster, name, args, run.output_path)
    return 0


def _emit_follow(submit, cluster, name: str, args: argparse.Namespace, output_path: str | None) -> None:
    progress = False if args.no_progress else sys.stderr.isatty()
    _emit(submit.follow(cluster, name, output_path=output_path, timeout=args.timeout, interval=args.interval,
                        progress=progress))


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
    for key in ("tile", "chunk", "region", "seed", "hyp"):
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
            _stage_label(args), EXIT_BUG, type(exc).__name__, exc, __version__,
        )
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
