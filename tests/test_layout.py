"""The house rules that keep the package easy to walk: no import cycles, and `--help` /
`--print-config` generated from the config dataclasses (so they cannot drift from the code)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from medi_dist import cli
from medi_dist.config_loader import config_fields, load_config
from medi_dist.train.config import TrainConfig
from medi_dist.tune.config import StudyConfig

PACKAGE = Path(__file__).resolve().parents[1] / "medi_dist"
JOBS = PACKAGE.parent / "jobs"


def import_graph() -> dict[str, set[str]]:
    """module -> the medi_dist modules it imports, at module level *and* inside functions: a lazy
    import still makes one module depend on the other (it only postpones the failure of a cycle)."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    graph = {}
    for mod, (path, is_pkg) in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = (
                    ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).rstrip(".")
                    if node.level
                    else node.module
                )
                targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from . import plots`
            else:
                continue
            for t in targets:
                while t and t not in files:  # a name imported from a module: the module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert graph["medi_dist.tune.study"] >= {"medi_dist.tune.report", "medi_dist.paths"}  # the walk sees lazy imports
    assert cycles(graph) == [], "modules that import each other"
    # Subpackages too (data, model, train, generate, evaluate, tune, and the top-level modules): a
    # layer never reaches back up, e.g. evaluate must not import tune, which builds on evaluate.
    top = {}
    for mod, deps in graph.items():
        top.setdefault(".".join(mod.split(".")[:2]), set()).update(".".join(d.split(".")[:2]) for d in deps)
    top = {k: v - {k} for k, v in top.items()}
    assert cycles(top) == [], "subpackages that import each other"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _leaves(cfg, prefix=""):
    """(dotted name, default) of every field that is not itself a dataclass section (a dict is a value)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


@pytest.mark.parametrize("command, cls", [("train", TrainConfig), ("tune", StudyConfig)])
def test_help_lists_every_field_with_its_default(command, cls, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {
        line.split(" = ")[0].strip(): line.split(" = ", 1)[1].split("  #")[0].strip()
        for line in lines
        if " = " in line and line.startswith("  ")
    }
    leaves = dict(_leaves(cls()))
    assert set(listed) == set(leaves)
    for key, value in leaves.items():  # the default as an override would write it
        assert yaml.safe_load(listed[key]) == value, key
    assert {k: v for k, v, _ in config_fields(cls)}["optim.lr" if cls is TrainConfig else "num_samples"]
    if cls is TrainConfig:  # the source comment comes along as the field's note
        assert any(line.strip().startswith("run.storage_path = ") and "cloud URI" in line for line in lines)


@pytest.mark.parametrize(
    "command, cls, config, overrides",
    [
        ("train", TrainConfig, "train_small.yaml", ["steps=7", "run.name=printed", "data.splits=[train,val]"]),
        ("tune", StudyConfig, "tune_small.yaml", ["space.ratio=1", "num_samples=3"]),
    ],
)
def test_print_config_shows_the_resolved_config(command, cls, config, overrides, capsys, tmp_path):
    assert cli.main([command, "--print-config", "--config", str(JOBS / config), *overrides]) == 0
    printed = capsys.readouterr().out
    expected = load_config(cls, JOBS / config, overrides)
    assert yaml.safe_load(printed) == dataclasses.asdict(expected)
    (tmp_path / "again.yaml").write_text(printed)  # the printed config is itself a valid --config
    assert load_config(cls, tmp_path / "again.yaml") == expected


def test_print_config_still_refuses_a_bad_override(capsys):
    assert cli.main(["train", "--print-config", "steps=-1"]) == 2
    captured = capsys.readouterr()
    assert "steps must be positive" in captured.err and captured.out == ""


def test_readme_module_table_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    modules = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(m for m in modules if f"| `{m}` |" not in readme)
    assert not missing, f"add these to the README's module table: {missing}"
