"""The side-by-side contract and the layout: the train.py files share their top-level names in
order and measure at the same points; imports run ampcompare/ -> arms -> record/ -> common/
only, with no cycle inside a package; docs/cli.md is each command's real --help."""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARMS = ("plain_torch", "lightning_impl", "fabric_impl", "accelerate_impl", "apex_impl")


def top_level_names(path):
    tree = ast.parse(path.read_text())
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def test_train_files_share_top_level_names_in_order():
    names = {arm: top_level_names(ROOT / arm / "train.py") for arm in ARMS}
    assert names["plain_torch"] == ["build", "fit", "train"]
    for arm in ARMS:
        assert names[arm] == names["plain_torch"], arm


def epoch_calls(path, owner):
    """The methods called on `owner` (e.g. "epoch", "self.epoch") in the file, in order."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if ast.unparse(node.func.value) == owner:
                found.append((node.lineno, node.col_offset, node.func.attr))
    return [name for *_, name in sorted(found)]


@pytest.mark.parametrize("arm", [a for a in ARMS if a != "lightning_impl"])
def test_every_hand_written_loop_measures_at_the_same_points(arm):
    assert epoch_calls(ROOT / arm / "train.py", "epoch") == [
        "batches",
        "measured",
        "step_done",
        "test_batches",
        "evaluated",
        "end",
    ]


def test_lightnings_callback_measures_where_the_plain_loop_does():
    # The Trainer runs the loop, so the callback makes by hand what epoch.batches() does for
    # the others: a step's start as its batch is handed out, the training's end when they run
    # out; its hooks stand in the order the Trainer calls them.
    plain = epoch_calls(ROOT / "plain_torch/train.py", "epoch")
    by_hand = {"batches": ["batch_started"], "test_batches": ["training_done"]}
    expected = [call for name in plain for call in by_hand.get(name, [name])]
    assert epoch_calls(ROOT / "lightning_impl/callback.py", "self.epoch") == expected


# Each package imports only those below it, and its own modules: the tool, the arms (none
# another), the run's record, the loop's ingredients.
LAYERS = [("ampcompare",), ARMS, ("record",), ("common",)]
PACKAGES = [pkg for layer in LAYERS for pkg in layer]


def imports_of(path):
    """(package, module or None) for every import in the file, at its top or inside a function:
    `from common import models` gives ("common", "models"), `import torch` ("torch", None)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(*a.name.split(".")[:2], None)[:2] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            package, _, module = node.module.partition(".")
            if module:
                found.append((package, module.split(".")[0]))
            else:
                found += [(package, a.name) for a in node.names]
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_one_way(package):
    layer = next(i for i, names in enumerate(LAYERS) if package in names)
    allowed = {package, *(p for names in LAYERS[layer + 1 :] for p in names)}
    wrong = [
        f"{path.name} imports {imported}"
        for path in sorted((ROOT / package).glob("*.py"))
        for imported, _ in imports_of(path)
        if imported in PACKAGES and imported not in allowed
    ]
    assert not wrong, wrong


@pytest.mark.parametrize("package", PACKAGES)
def test_no_cycle_inside_a_package(package):
    folder = ROOT / package
    graph = {
        path.stem: {
            m for p, m in imports_of(path) if p == package and (folder / f"{m}.py").exists()
        }
        for path in folder.glob("*.py")
    }
    state = {}  # module -> "open" while its imports are being followed, "done" after

    def follow(module, trail):
        if state.get(module) == "open":
            return trail[trail.index(module) :] + [module]
        if state.get(module) == "done":
            return None
        state[module] = "open"
        for other in sorted(graph[module]):
            cycle = follow(other, [*trail, module])
            if cycle:
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        cycle = follow(module, [])
        assert not cycle, " -> ".join(cycle)


def test_no_module_changes_another_modules_lists():
    # Hooks are installed by a context manager of the module that calls them (metrics.hooked,
    # signals.listening), never appended to a list another module owns.
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            imported = {m for p, m in imports_of(path) if p in PACKAGES and m}
            for node in ast.walk(ast.parse(path.read_text())):
                call = node.func if isinstance(node, ast.Call) else None
                owner = getattr(call, "value", None)
                if (
                    isinstance(call, ast.Attribute)
                    and call.attr in ("append", "remove", "extend", "insert", "clear")
                    and isinstance(owner, ast.Attribute)
                    and isinstance(owner.value, ast.Name)
                    and owner.value.id in imported
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_no_module_keeps_a_list_that_its_functions_grow():
    # No registry of hooks or listeners at module level: a context manager sets the one that
    # is called for its time (metrics.hooked, signals.listening) and puts back what it found.
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            tree = ast.parse(path.read_text())
            module_names = {
                t.id
                for node in tree.body
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Name)
            }
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    call = node.func if isinstance(node, ast.Call) else None
                    owner = getattr(call, "value", None)
                    while isinstance(owner, ast.Subscript):
                        owner = owner.value
                    if (
                        isinstance(call, ast.Attribute)
                        and call.attr in ("append", "extend", "insert", "add")
                        and isinstance(owner, ast.Name)
                        and owner.id in module_names
                    ):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {owner.id}")
    assert not found, found


def test_the_cli_reference_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import cli_reference
    finally:
        sys.path.pop(0)
    page = (ROOT / "docs" / "cli.md").read_text()
    assert page.count(cli_reference.START) == 1 and page.count(cli_reference.END) == 1
    assert cli_reference.updated(page) == page, (
        "docs/cli.md is stale: run .venv/bin/python scripts/cli_reference.py"
    )


def test_no_function_is_over_60_lines():
    packages = ("ampcompare", "common", "record", *ARMS, "scripts", "tests")
    long = []
    for path in (p for pkg in packages for p in sorted((ROOT / pkg).glob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
