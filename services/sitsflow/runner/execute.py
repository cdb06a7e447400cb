"""Execute the rendered WorkflowTemplate's DAG on this machine (``sitsflow run``).

Every task of the entrypoint DAG runs its container's command as a local process (``sitsflow``
becomes ``python -m sitsflow`` with this interpreter), with the Argo semantics the pipeline relies
on: workflow and input parameters, ``depends``, ``withParam`` (or ``withSequence``) fan-out, and a
task's stdout as its ``outputs.result`` (one trailing newline removed; more than Argo's 256 KiB
fails the run when another task reads it, since the cluster would cut it). ``env`` values are
applied, empty ones and ``valueFrom`` (Secrets) inherit the local environment; a container whose
resources (``podSpecPatch`` included) request no ``nvidia.com/gpu`` runs with
``CUDA_VISIBLE_DEVICES=""``, as a pod without a GPU sees none.

What only a cluster does is left to it: retries, deadlines, parallelism, node placement, volumes
and the image. After the first failure no new task starts and the running ones finish; a rerun
resumes, since every stage skips the work it finished before. Each task runs in its own process
group: stopping the runner (SIGINT, SIGTERM) stops them (SIGTERM, SIGKILL after
:data:`STOP_GRACE_S`), and a small watcher process does the same if the runner is killed outright.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sitsflow.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, BadInputError, SitsflowError
from sitsflow.log import get_logger
from sitsflow.runner.display import Display, make_display
from sitsflow.runner.workflow import (
    dependencies,
    entry_dag,
    format_value,
    item_scope,
    load_workflow,
    substitute,
)

log = get_logger(__name__)

#: Argo's executor keeps only the last 256 KiB of a step's stdout as its ``outputs.result``
#: (``CaptureScriptResult``, workflow/executor/executor.go: ``maxAnnotationSize``).
RESULT_LIMIT = 256 * 1024
#: Seconds between SIGTERM and SIGKILL when tasks are stopped (Kubernetes' default grace period).
STOP_GRACE_S = 30.0
#: Lines of a failed task's stderr quoted in the error.
TAIL_LINES = 20


class WorkflowFailed(SitsflowError):
    """A task failed; no new task was started after it.

    ``exit_code`` is the task's own when it is 2 (bad input) or 75 (transient), else 1, so
    ``sitsflow run`` exits as the failing stage did. ``summary`` is the state of every task.
    """

    def __init__(self, message: str, task: str, returncode: int | None, log_path: Path | None):
        super().__init__(message)
        self.task, self.returncode, self.log_path = task, returncode, log_path
        self.summary: dict[str, Any] = {}
        self.exit_code = returncode if returncode in (EXIT_BAD_INPUT, EXIT_TRANSIENT) else 1


class Interrupted(SitsflowError):
    """The runner was stopped by a signal, and its tasks with it: SIGTERM exits 75 (a clean
    stop, as a stage's; a rerun resumes), SIGINT 130 (the user's Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; every task was stopped")
        self.exit_code = EXIT_TRANSIENT if signum == signal.SIGTERM else 128 + signum


def container_argv(command: Sequence[str], args: Sequence[str]) -> list[str]:
    """The local command line of a container: ``sitsflow`` runs with this interpreter."""
    command = list(command)
    if command[:1] == ["sitsflow"]:
        command = [sys.executable, "-m", "sitsflow", *command[1:]]
    return [*command, *args]


def workflow_parameters(spec: Mapping[str, Any], given: Mapping[str, str]) -> dict[str, str]:
    """Declared workflow parameters, their defaults overridden by ``given``.

    Raises:
        BadInputError: an undeclared parameter, or a required one missing.
    """
    declared = {str(p["name"]): p for p in (spec.get("arguments") or {}).get("parameters") or []}
    if unknown := sorted(set(given) - set(declared)):
        raise BadInputError(f"unknown workflow parameter(s) {', '.join(unknown)}; declared: {', '.join(declared)}")
    values = {}
    for name, param in declared.items():
        if name not in given and "value" not in param:
            raise BadInputError(f"workflow parameter {name!r} is required and was not given")
        values[f"workflow.parameters.{name}"] = str(given[name]) if name in given else format_value(param["value"])
    return values


@dataclass
class _Node:
    """One process: a task, or one item of a fan-out."""

    task: str
    index: int
    label: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    inputs: dict[str, str]
    pod: dict[str, Any]


def _json(text: str, scope: Mapping[str, str], where: str, kind: type[list[Any] | dict[str, Any]]) -> Any:
    """``text`` substituted, then read as a JSON list or object (``where`` names the field)."""
    text = substitute(text, scope, where)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{where} is not JSON ({exc}): {text[:300]!r}") from None
    if not isinstance(value, kind):
        raise BadInputError(f"{where} is not a JSON {kind.__name__}: {text[:300]!r}")
    return value


def _gpus(template: Mapping[str, Any], patch: Mapping[str, Any]) -> float:
    """``nvidia.com/gpu`` the pod asks for: the container's resources, as the patch leaves them."""
    found = "0"
    layers = [template["container"].get("resources") or {}]
    layers += [c.get("resources") or {} for c in patch.get("containers") or [] if c.get("name") == "main"]
    for resources in layers:
        for kind in ("requests", "limits"):
            found = str((resources.get(kind) or {}).get("nvidia.com/gpu", found))
    try:
        return float(found)
    except ValueError:
        return 1.0  # a value Kubernetes would refuse: do not hide the GPU because of it


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-TAIL_LINES:])
    except OSError:
        return ""


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


#: The watcher, a process of its own: it reads ``+pgid``/``-pgid`` lines, and once the runner's
#: end of the pipe closes (the runner is stopping, or died however it died) it stops every group
#: still listed: SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`, as Kubernetes stops a pod.
_WATCHER = f"""
import os, signal, sys, time
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
def send(signum):
    for group in groups:
        try:
            os.killpg(group, signum)
        except OSError:
            pass
def running(pid):  # a group's first process (pid = pgid) has not ended (zombies have)
    try:
        if not os.path.isdir("/proc/self"):  # no procfs: the runner reaps its zombies
            return os.kill(pid, 0) is None
        with open(f"/proc/{{pid}}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False
send(signal.SIGTERM)
end = time.monotonic() + {STOP_GRACE_S}
while any(map(running, groups)) and time.monotonic() < end:
    time.sleep(0.1)
send(signal.SIGKILL)
"""


class _Signals:
    """SIGINT and SIGTERM become :class:`Interrupted`, raised only while the runner waits for a
    task (never between starting a process and recording it); installed in the main thread only."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.waiting = False
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum
        if self.waiting:
            raise Interrupted(signum)

    def wait(self, done: queue.Queue[tuple[int, int]]) -> tuple[int, int]:
        self.waiting = True
        try:
            if self.received is not None:
                raise Interrupted(self.received)
            return done.get()
        finally:
            self.waiting = False

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


class _Run:
    """One execution of the DAG; every state change happens on the calling thread."""

    def __init__(self, doc: dict[str, Any], parameters: Mapping[str, str], workers: int, log_dir: Path) -> None:
        self.tasks, self.templates = entry_dag(doc)
        self.deps = {str(t["name"]): dependencies(t) for t in self.tasks}
        self.scope = workflow_parameters(doc["spec"], parameters)
        self.workers, self.log_dir = workers, log_dir
        text = json.dumps(self.tasks)
        #: Tasks whose result another task reads: their stdout must fit Argo's limit.
        self.read = {
            name
            for name in self.deps
            if f"tasks.{name}.outputs.result" in text or f"tasks['{name}'].outputs.result" in text
        }
        self.status = {name: "Pending" for name in self.deps}
        self.results: dict[str, list[str | None]] = {}
        self.nodes: dict[str, list[_Node]] = {}
        self.queue: deque[_Node] = deque()
        self.failure: WorkflowFailed | None = None
        self.display: Display = make_display(False)

    def _items(self, task: Mapping[str, Any], scope: Mapping[str, str]) -> list[Any] | None:
        """A task's fan-out items (None: no fan-out)."""
        where = f"task {task['name']!r}"
        if "withSequence" in task:  # numbers start..end, or count numbers from start
            seq = {k: substitute(format_value(v), scope, where) for k, v in task["withSequence"].items()}
            try:
                start = int(seq.get("start", "0"))
                end = int(seq["end"]) if "end" in seq else start + int(seq["count"]) - 1
            except (KeyError, ValueError):
                raise BadInputError(f"{where}: withSequence needs an integer count or end: {seq}") from None
            return [str(i) for i in range(start, end + 1)]
        if "withParam" not in task:
            return None
        return list(_json(str(task["withParam"]), scope, f"{where}: withParam", list))

    def _node(self, task: Mapping[str, Any], index: int | None, item: Any, scope: dict[str, str]) -> _Node:
        """Substitute a task's arguments, then its template, for one item (or the task)."""
        name, label = str(task["name"]), str(task["name"])
        if index is not None:
            scope = {**scope, **item_scope(item)}
            if isinstance(item, dict):
                item = ",".join(f"{k}:{format_value(v)}" for k, v in sorted(item.items()))
            label = f"{name}({index}:{format_value(item)})"  # Argo's node name
        passed = {
            str(p["name"]): substitute(format_value(p.get("value", "")), scope, f"task {label} argument {p['name']!r}")
            for p in (task.get("arguments") or {}).get("parameters") or []
        }
        template = self.templates[str(task["template"])]
        inner, inputs = dict(self.scope), {}
        for param in (template.get("inputs") or {}).get("parameters") or []:
            pname = str(param["name"])
            if pname not in passed and "default" not in param and "value" not in param:
                raise BadInputError(f"task {label}: input {pname!r} of template {template['name']!r} was not passed")
            inputs[pname] = passed.get(pname, format_value(param.get("value", param.get("default"))))
            inner[f"inputs.parameters.{pname}"] = inputs[pname]
        where = f"template {template['name']!r} (task {label})"
        container = template["container"]
        argv = container_argv(
            [substitute(format_value(c), inner, where) for c in container["command"]],
            [substitute(format_value(a), inner, where) for a in container.get("args") or []],
        )
        env = dict(os.environ)
        for var in container.get("env") or []:
            value = substitute(format_value(var["value"]), inner, where) if "value" in var else ""
            if value:  # valueFrom (Secrets) and empty values: the local environment's
                env[str(var["name"])] = value
        patch = template.get("podSpecPatch")
        pod = _json(str(patch), inner, f"{where}: podSpecPatch", dict) if patch else {}
        if _gpus(template, pod) <= 0:
            env["CUDA_VISIBLE_DEVICES"] = ""
        log_name = name if index is None else f"{name}-{index}"
        return _Node(name, index or 0, label, argv, env, self.log_dir / f"{log_name}.log", inputs, pod)

    def _fail(self, task: str, returncode: int | None, log_path: Path | None, message: str) -> None:
        self.status[task] = "Failed"
        if self.failure is None:
            self.failure = WorkflowFailed(message, task, returncode, log_path)

    def _schedule(self) -> None:
        """Queue every task whose dependencies are done (again while one completes at once)."""
        changed = True
        while changed and self.failure is None:
            changed = False
            scope = dict(self.scope)
            for name, results in self.results.items():
                if self.status[name] == "Succeeded" and len(self.nodes[name]) == 1:
                    scope[f"tasks.{name}.outputs.result"] = results[0] or ""
            for task in self.tasks:
                name = str(task["name"])
                if self.status[name] != "Pending" or any(
                    self.status[d] not in ("Succeeded", "Skipped") for d in self.deps[name]
                ):
                    continue
                changed = True
                try:
                    items = self._items(task, scope)
                    nodes = (
                        [self._node(task, None, None, scope)]
                        if items is None
                        else [self._node(task, i, item, scope) for i, item in enumerate(items)]
                    )
                except BadInputError as exc:
                    self._fail(name, EXIT_BAD_INPUT, None, str(exc))
                    return
                self.nodes[name], self.results[name] = nodes, [None] * len(nodes)
                if not nodes:  # Argo skips a task whose fan-out is empty
                    self.status[name] = "Skipped"
                    self.display.task_done(name, "Skipped")
                    continue
                self.status[name] = "Running"
                self.display.task_started(name, len(nodes))
                self.queue.extend(nodes)

    def _start(self, node: _Node) -> tuple[subprocess.Popen[bytes], IO[bytes]] | None:
        log.debug("running %s: %s", node.label, " ".join(node.argv))
        self.display.node_started(node.label)
        stdout = tempfile.TemporaryFile()
        try:
            with open(node.log_path, "wb") as stderr:
                proc = subprocess.Popen(  # in its own process group (= its pid), stopped whole
                    node.argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                    env=node.env, start_new_session=True,
                )  # fmt: skip
        except OSError as exc:
            stdout.close()
            message = f"task {node.label} failed: could not start {node.argv[0]!r}: {exc}"
            self._fail(node.task, None, node.log_path, message)
            return None
        return proc, stdout

    def _finish(self, node: _Node, returncode: int, stdout: IO[bytes], seconds: float) -> None:
        stdout.seek(0)
        data = stdout.read()
        stdout.close()
        data = data[:-1] if data.endswith(b"\n") else data  # as Argo: one newline trimmed
        if returncode == 0 and len(data) > RESULT_LIMIT:
            message = (
                f"task {node.label} printed {len(data)} bytes on stdout; Argo keeps only the last "
                f"{RESULT_LIMIT} bytes (256 KiB) of a step's outputs.result"
            )
            if node.task in self.read:
                message += ", so on a cluster the tasks that read it would get a cut, invalid value"
                self.display.node_failed(node.label, returncode, "")
                self._fail(node.task, EXIT_BAD_INPUT, node.log_path, message)
                return
            log.warning("%s (no task reads it)", message)
            data = data[-RESULT_LIMIT:]
        if returncode == 0:
            self.results[node.task][node.index] = data.decode("utf-8", errors="replace")
            self.display.node_done(node.label, seconds)
            if all(r is not None for r in self.results[node.task]):
                self.status[node.task] = "Succeeded"
                self.display.task_done(node.task, "Succeeded")
            return
        if returncode < 0:
            message = f"task {node.label} was killed by signal {-returncode}"
        else:
            message = f"task {node.label} failed with exit code {returncode}"
        tail = _tail(node.log_path)
        message += f"\n--- last lines of {node.log_path} ---\n{tail}" if tail else f" (log: {node.log_path})"
        self.display.node_failed(node.label, returncode, tail)
        self._fail(node.task, returncode, node.log_path, message)

    def summary(self) -> dict[str, Any]:
        return {
            name: {
                "status": status,
                "results": [r for r in self.results.get(name, []) if r is not None],
                "inputs": [n.inputs for n in self.nodes.get(name, [])],
                "pods": [n.pod for n in self.nodes.get(name, [])],
            }
            for name, status in self.status.items()
        }

    def execute(self, display: Display) -> dict[str, Any]:
        """Run the DAG; the summary of every task.

        Raises:
            WorkflowFailed: after the first failure, once the running tasks finished.
            Interrupted: SIGINT or SIGTERM; every running task was stopped first.
        """
        self.display = display
        done: queue.Queue[tuple[int, int]] = queue.Queue()
        running: dict[int, tuple[_Node, subprocess.Popen[bytes], IO[bytes], float]] = {}
        watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C on the terminal must not stop the watcher
        )
        assert watcher.stdin is not None

        def tell(line: str) -> None:
            watcher.stdin.write(line + "\n")  # type: ignore[union-attr]
            watcher.stdin.flush()  # type: ignore[union-attr]

        with _Signals() as signals:
            try:
                while True:
                    self._schedule()
                    while self.failure is None and self.queue and len(running) < self.workers:
                        node = self.queue.popleft()
                        if (started := self._start(node)) is not None:
                            proc, stdout = started
                            running[proc.pid] = (node, proc, stdout, time.monotonic())
                            tell(f"+{proc.pid}")
                            threading.Thread(target=lambda p=proc: done.put((p.pid, p.wait())), daemon=True).start()
                    if not running:
                        break
                    pid, returncode = signals.wait(done)
                    node, _, stdout, start = running.pop(pid)
                    _signal_group(pid, signal.SIGKILL)  # what it left behind ends with it
                    tell(f"-{pid}")
                    self._finish(node, returncode, stdout, time.monotonic() - start)
            finally:  # interrupted: the watcher stops the running tasks; then they are reaped
                if running:
                    log.warning("stopping %d running task(s)", len(running))
                watcher.stdin.close()
                watcher.wait()
                for _, proc, _, _ in running.values():
                    proc.wait()
        if self.failure is not None:
            self.failure.summary = self.summary()
            raise self.failure
        return self.summary()


def run_workflow(
    path: str | Path,
    parameters: dict[str, str],
    *,
    workers: int = 1,
    progress: bool | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Execute a rendered Argo Workflow/WorkflowTemplate YAML on this machine.

    Args:
        path: the YAML file (the pipeline's: :func:`sitsflow.runner.default_workflow_path`).
        parameters: workflow parameters by name; undeclared ones are refused, declared ones not
            given take their default.
        workers: processes run at the same time, at least 1.
        progress: a rich progress display on stderr (None: when stderr is a terminal; otherwise
            one log line per task start and end).
        log_dir: where each task's stderr goes (``<task>.log``, ``<task>-<index>.log`` for
            fan-out items); default a new temporary folder.

    Returns:
        ``{"tasks": {name: {"status": "Succeeded"|"Skipped", "results": [stdout, ...],
        "inputs": [{param: value}, ...], "pods": [podSpecPatch, ...]}}, "duration_s": float,
        "log_dir": str, "workers": int}``, with one entry per fan-out item in each list.

    Raises:
        BadInputError: the document uses what the runner cannot run, or the parameters are
            wrong; nothing has run.
        WorkflowFailed: a task failed (its ``exit_code`` is 2 or 75 when the task's was).
        Interrupted: SIGINT or SIGTERM stopped the run and its tasks.
    """
    if workers < 1:
        raise BadInputError(f"workers must be at least 1, got {workers}")
    start = time.monotonic()
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="sitsflow-run-"))
    run = _Run(load_workflow(path), parameters, workers, log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log.info(
        "running %s (%d tasks, %d worker(s)); task logs in %s",
        path,
        len(run.tasks),
        workers,
        log_dir,
    )
    try:
        with make_display(sys.stderr.isatty() if progress is None else progress) as display:
            tasks = run.execute(display)
    except WorkflowFailed as exc:
        log.error("%s", exc)
        raise
    duration = time.monotonic() - start
    log.info("workflow %s succeeded in %.1f s", path, duration)
    return {
        "tasks": tasks,
        "duration_s": round(duration, 3),
        "log_dir": str(log_dir),
        "workers": workers,
    }
