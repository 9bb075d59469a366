"""The package's import layers, read from the source: each module imports only its own layer
and those below it, so reading results never loads Ray and the model code never loads the
search. Layers, bottom first:

    errors, progress, paths, rundir,         (bottom: errors and progress lines, names, files,
    quality, config, track, raylocal          directions, strict loading, MLflow, a local Ray)
    arch                                     (spec, builder, cost model)
    data                                     (datasets, text encoders, the data pipeline)
    train                                    (trainer, metrics, checkpoints)
    search, export                           (sweeps, promote; ONNX / Core ML)
    analysis                                 (reports, plots, reliability)
    cli
"""

import ast
import subprocess
import sys
from pathlib import Path

import mdsearch

PACKAGE = Path(mdsearch.__file__).parent
LAYERS = [{"errors", "progress", "paths", "rundir", "quality", "config", "track", "raylocal",
           "__init__"},
          {"arch"}, {"data"}, {"train"}, {"search", "export"}, {"analysis"}, {"cli"}]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
BOTTOM = {"errors": set(), "progress": set(), "paths": set(), "raylocal": {"errors"},
          "rundir": {"errors"},
          "quality": {"rundir", "paths", "errors"}, "track": {"rundir", "errors"},
          "config": {"errors"}}  # within the bottom layer: what each may import (no cycles)


def top(module: Path) -> str:
    parts = module.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imports(module: Path) -> set[str]:
    """mdsearch's top-level units imported by `module` (at any depth of the file: lazy imports
    inside functions count too)."""
    tree = ast.parse(module.read_text())
    package = module.relative_to(PACKAGE).parent.parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(package[:len(package) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # `from . import x` at the package root
                    target = [node.names[0].name]
            elif node.module and node.module.startswith("mdsearch"):
                target = node.module.split(".")[1:] or [node.names[0].name]
            else:
                continue
            found.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mdsearch."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_import_goes_down_the_layers():
    wrong = []
    for module in sorted(PACKAGE.rglob("*.py")):
        unit = top(module)
        for target in imports(module) - {unit}:
            if target not in RANK:
                wrong.append(f"{module.relative_to(PACKAGE)} imports unknown unit {target}")
            elif RANK[target] > RANK[unit]:
                wrong.append(f"{module.relative_to(PACKAGE)} ({unit}) imports {target}, a higher "
                             "layer")
            elif unit in BOTTOM and target not in BOTTOM[unit] and RANK[target] == 0:
                wrong.append(f"{module.relative_to(PACKAGE)} imports {target} inside the bottom "
                             "layer")
    assert not wrong, "\n".join(wrong)


def test_rundir_imports_nothing_else_of_mdsearch():
    assert imports(PACKAGE / "rundir.py") <= {"errors"}


def test_reading_results_does_not_load_ray():
    code = ("import sys; import mdsearch.cli as c; c.main(['report', '--help']) if False else None;"
            "import mdsearch.analysis.report, mdsearch.arch.cost, mdsearch.rundir;"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    # the command itself: parse `report --help` (argparse exits 0 after printing help)
    code = ("import sys\nfrom mdsearch.cli import main\ntry:\n    main(['report', '--help'])\n"
            "except SystemExit:\n    pass\nprint('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
