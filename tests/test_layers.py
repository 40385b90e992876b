"""The package's shape, read from its source with ``ast``: imports point one way, no private name crosses a
module, the toy world stays beside the library, and the old import paths still resolve."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "nested"

# Lower layers never import higher ones; modules of one subpackage may import each other.
CORE = {"attention", "adapter", "encoder", "tokens", "backbone", "errors", "files", "testing", "_lazy"}
CORE |= {"image_files", "dit", "quantize", "prompt_cache", "library_messages", "hub_access"}
LAYERS = {
    "core": 0,
    "data": 1,
    "inference": 1,
    "hub": 1,
    "evaluation": 2,
    "training": 3,
    "callbacks": 3,
    "cli": 4,
    "__main__": 5,  # python -m nested: the command line
    "compat": 5,  # the older top-level paths: they import their new homes, nothing imports them
    "toyworld": 6,  # research code that uses the library; the library never imports it
}
COMPAT = {"pipeline", "module", "metrics", "sampling"}
CORE |= {"signals"}  # nested.signals: the stop-signal flag that training, callbacks and the CLI share


def layer_of(module: str) -> str:
    """``nested.data.shards`` -> ``data``; ``nested.adapter`` -> ``core``; ``nested`` -> the front door."""
    parts = module.split(".")
    if len(parts) == 1:
        return "front"
    if parts[1] in CORE:
        return "core"
    if parts[1] in COMPAT and len(parts) == 2:
        return "compat"
    return parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def nested_imports(source: str, module: str) -> list[tuple[int, str, list[str], bool]]:
    """(line, imported module, names, inside a function) for every ``nested`` import of ``source``."""
    tree = ast.parse(source)
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(sub) for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "nested"
        ):
            found.append((node.lineno, node.module, [a.name for a in node.names], id(node) in inside))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nested":
                    found.append((node.lineno, alias.name, [], id(node) in inside))
    return found


def violations(sources: dict[str, str]) -> list[str]:
    """Every wrong-way edge and every private name imported from another module, in ``sources``
    (module name -> source text)."""
    problems = []
    for module, source in sources.items():
        here = layer_of(module)
        for line, imported, names, _ in nested_imports(source, module):
            there = layer_of(imported)
            where = f"{module}:{line} imports {imported}"
            if here == "front":
                # Besides its lazy exports, the front door installs the filters that keep the libraries'
                # import-time messages out of every command (standard library only).
                if imported != "nested._lazy" and (imported, names) != (
                    "nested.library_messages",
                    ["quiet_library_messages"],
                ):
                    problems.append(f"{where}: the front door exports lazily, by name")
                continue
            if there == "toyworld" and here != "toyworld":
                problems.append(f"{where}: the library never imports the toy world")
            elif there == "compat" and here != "compat":
                problems.append(f"{where}: an older path; import the module's new home")
            elif there not in ("core", here) and LAYERS.get(there, 0) >= LAYERS.get(here, 0):
                problems.append(f"{where}: {here} may not import {there}")
            private = [name for name in names if name.startswith("_") and imported != module]
            if private and imported != "nested._lazy":
                problems.append(f"{where}: private names {private} used outside their module")
    return problems


def package_sources() -> dict[str, str]:
    return {module_name(path): path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py")}


def test_imports_point_one_way_and_no_private_name_crosses_a_module():
    assert violations(package_sources()) == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        (
            "nested.adapter",
            "from nested.training.module import NestedAttentionModule\n",
            "core may not import",
        ),
        (
            "nested.data.shards",
            "from nested.inference.pipeline import NestedPipeline\n",
            "data may not import",
        ),
        (
            "nested.evaluation.sweep",
            "from nested.toyworld.judges import ToyJudges\n",
            "never imports the toy",
        ),
        ("nested.hub.push", "from nested.cli.push import main_push\n", "hub may not import cli"),
        ("nested.cli.push", "from nested.hub.push import _stage\n", "private names ['_stage']"),
        ("nested.cli.eval", "from nested.pipeline import NestedPipeline\n", "an older path"),
        (
            "nested.training.module",
            "def f():\n    from nested.cli.fit import NestedCLI\n",
            "training may not import",
        ),
    ],
)
def test_a_wrong_way_import_is_caught(module, source, expected):
    """The check above is only as good as its detector: each planted mistake is reported."""
    sources = {**package_sources(), module: package_sources()[module] + source}
    found = violations(sources)
    assert len(found) == 1 and expected in found[0], found


def test_function_local_imports_of_the_package_say_why():
    """An import inside a function keeps a heavy dependency out of a light command; the line (or the
    comment above it) says so. Any other import belongs at the top of its module."""
    unexplained = []
    for module, source in package_sources().items():
        lines = source.splitlines()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            imports = [sub for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom))]
            for first in imports[:1]:  # the first of a block carries the reason for the block
                said = lines[first.lineno - 1] + lines[first.lineno - 2]
                if "#" not in said:
                    unexplained.append(f"{module}:{first.lineno} in {node.name}()")
    assert unexplained == []


def test_import_nested_loads_no_framework_and_the_front_door_resolves():
    code = (
        "import sys, nested\n"
        "heavy = [m for m in sys.modules if m.startswith(('torch', 'lightning', 'diffusers'))]\n"
        "print(len(heavy))\n"
        "from nested import NestedPipeline, NestedAdapter, NestedAttentionModule, NestedDataModule, Subject\n"
        "print(NestedPipeline.__module__, NestedAdapter.__module__, NestedAttentionModule.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, modules = done.stdout.splitlines()
    assert count == "0"
    assert modules == "nested.inference.pipeline nested.adapter nested.training.module"


@pytest.mark.parametrize("command", [["push", "--help"], ["shards", "--help"], ["--help"]])
def test_light_commands_do_not_import_lightning(command):
    code = (
        "import sys, contextlib, io\n"
        "from nested.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    try: main({command!r})\n"
        "    except SystemExit: pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torch', 'diffusers'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("old_path", "new_home"),
    [
        # every model card pushed so far says `from nested.pipeline import NestedPipeline`
        ("nested.pipeline.NestedPipeline", "nested.inference.pipeline.NestedPipeline"),
        ("nested.pipeline.Subject", "nested.inference.subjects.Subject"),
        # class_paths that saved configs and callback presets name
        ("nested.hub.HubUpload", "nested.callbacks.hub_upload.HubUpload"),
        ("nested.callbacks.AdapterEMA", "nested.callbacks.ema.AdapterEMA"),
        ("nested.callbacks.AdapterExport", "nested.callbacks.export.AdapterExport"),
        ("nested.callbacks.HubUpload", "nested.callbacks.hub_upload.HubUpload"),
        ("nested.sampling.SampleGrid", "nested.callbacks.sample_grid.SampleGrid"),
        ("nested.metrics.PromptAlignment", "nested.evaluation.metrics.PromptAlignment"),
        ("nested.metrics.IdentitySimilarity", "nested.evaluation.metrics.IdentitySimilarity"),
        ("nested.module.NestedAttentionModule", "nested.training.module.NestedAttentionModule"),
        ("nested.data.NestedDataModule", "nested.data.datamodule.NestedDataModule"),
        ("nested.data.DomainSpec", "nested.data.domains.DomainSpec"),
        ("nested.toyworld.render", "nested.toyworld.world.render"),
    ],
)
def test_old_paths_still_resolve(old_path, new_home):
    def resolve(path: str):
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    assert resolve(old_path) is resolve(new_home)


def test_the_presets_class_paths_resolve():
    """Every class_path a callbacks/ preset or a config names is importable (the LightningCLI way)."""
    import yaml

    root = SRC.parent
    paths = set()

    def walk(value):
        if isinstance(value, dict):
            if isinstance(value.get("class_path"), str):
                paths.add(value["class_path"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for file in [*(root / "callbacks").glob("*.yaml"), *(root / "configs").rglob("*.yaml")]:
        walk(yaml.safe_load(file.read_text()))
    assert any(path.startswith("nested.") for path in paths)
    for path in sorted(paths):
        module, _, name = path.rpartition(".")
        assert getattr(importlib.import_module(module), name), path
