"""Every test module has a tier (tests/conftest.py TIERS), so `pytest -m unit` and the others select the whole suite."""

from pathlib import Path

from tests.conftest import TIER_OF, TIERS


def test_every_test_module_has_one_tier():
    modules = {p.stem for p in Path(__file__).parent.glob("test_*.py")}
    assert sorted(modules - set(TIER_OF)) == [], "add these to tests/conftest.py TIERS"
    assert sorted(set(TIER_OF) - modules) == [], "these are in TIERS but no longer exist"
    named = [name for names in TIERS.values() for name in names.split()]
    assert len(named) == len(set(named)), "a module is in two tiers"
