"""The side-by-side contract and the layout: the train.py files share their top-level names in
order and fit `sdiff -w 200`; imports run ampcompare/ -> arms -> common/ only; the README's CLI
reference is each command's real --help."""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARMS = ("plain_torch", "lightning_impl", "fabric_impl", "accelerate_impl", "apex_impl")
SIDE_BY_SIDE = [ROOT / arm / "train.py" for arm in ARMS] + [
    ROOT / "lightning_impl" / "module.py"
]


def top_level_names(path):
    tree = ast.parse(path.read_text())
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def test_train_files_share_top_level_names_in_order():
    names = {arm: top_level_names(ROOT / arm / "train.py") for arm in ARMS}
    assert names["plain_torch"] == ["build", "fit", "train"]
    for arm in ARMS:
        assert names[arm] == names["plain_torch"], arm


@pytest.mark.parametrize("path", SIDE_BY_SIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_lines_fit_side_by_side(path):
    wide = [i for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
    assert not wide, f"{path.name}: lines over 100 characters: {wide}"


def imported_packages(folder):
    found = {}
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def test_imports_run_one_way():
    assert not {"ampcompare", *ARMS} & set(imported_packages("common"))
    for arm in ARMS:
        others = {"ampcompare", *ARMS} - {arm}
        assert not others & set(imported_packages(arm)), arm


def test_the_cli_reference_in_the_readme_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cli_reference
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text()
    assert readme.count(cli_reference.START) == 1 and readme.count(cli_reference.END) == 1
    assert cli_reference.updated(readme) == readme, (
        "README.md's CLI reference is stale: run .venv/bin/python scripts/cli_reference.py"
    )
