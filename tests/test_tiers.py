"""Every test module has a tier (tests/conftest.py TIERS), so `pytest -m unit` and the others select the whole suite."""

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import SHARED_SERVERS, TIER_OF, TIERS
from tests.helpers import REPO


def test_every_test_module_has_one_tier():
    modules = {p.stem for p in Path(__file__).parent.glob("test_*.py")}
    assert sorted(modules - set(TIER_OF)) == [], "add these to tests/conftest.py TIERS"
    assert sorted(set(TIER_OF) - modules) == [], "these are in TIERS but no longer exist"
    named = [name for names in TIERS.values() for name in names.split()]
    assert len(named) == len(set(named)), "a module is in two tiers"


def test_shared_server_groups_name_existing_modules_using_that_server():
    """Each module of a SHARED_SERVERS group exists and asks for the group's session fixture, itself or through a
    test module it imports fixtures from: the group is what puts the users of one server on one worker."""
    modules = {p.stem: p.read_text() for p in Path(__file__).parent.glob("test_*.py")}
    for fixture, names in SHARED_SERVERS.items():
        for name in names:
            text = modules.get(f"test_{name}")
            assert text is not None, f"SHARED_SERVERS names test_{name}, which does not exist"
            imported = re.findall(r"from tests\.(test_\w+) import", text)
            assert any(fixture in t for t in [text, *(modules.get(m, "") for m in imported)]), (name, fixture)


def test_xdist_groups_reach_the_scheduler():
    """`--dist loadgroup` keeps a group on one worker only if pytest-xdist can add the group to the node id; pytest 9.2
    renamed what it writes (so every module's servers started on every worker and CI took 29 min): pyproject pins
    pytest, and this fails if the groups stop arriving."""
    test = "tests/test_tiers.py::test_every_test_module_has_one_tier"
    res = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                          "-v", test], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"PASSED {test}@test_tiers" in res.stdout, res.stdout[-2000:]
