"""The package rules of docs/design.md §1 and the registries, checked against the tree.

* The engine (``csprune`` outside ``csprune/train``) never imports ``csprune.train``, ``recipes`` or
  Hydra — statically (every import statement, also inside functions) and at run time.
* Every name a config, the CLI help or the docs offers for a method, schedule, solver, solver option,
  sensing or scope is in its registry, and every registry entry is offered.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

ENGINE = REPO / "csprune"
FORBIDDEN = ("csprune.train", "recipes", "hydra", "omegaconf", "tensorboard", "matplotlib", "soundfile", "torchaudio")
# The one sanctioned exception: `csprune report` (a CLI subcommand, glue by nature) imports the report module
# when it runs; the engine's import does not.
ALLOWED = {("csprune/cli.py", "csprune.train.report")}


def _imports(path: Path) -> list[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names]
    return names


def test_engine_modules_never_import_the_glue_recipes_or_hydra():
    offenders = []
    for path in sorted(ENGINE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("csprune/train/"):
            continue
        for name in _imports(path):
            allowed = any(rel == r and (name == m or name.startswith(m + ".")) for r, m in ALLOWED)
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN) and not allowed:
                offenders.append(f"{rel}: {name}")
    assert not offenders, offenders


def test_importing_the_engine_loads_none_of_them():
    code = ("import sys, csprune, csprune.cli, csprune.export, csprune.solvers, csprune.methods, csprune.masks, csprune.stats;"
            "print(' '.join(sorted({m.split('.')[0] if not m.startswith('csprune.') else m for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.split()
    assert not [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)], loaded


def test_glue_may_import_the_engine_but_not_the_recipes():
    offenders = [f"{p.relative_to(REPO)}: {n}" for p in sorted((ENGINE / "train").rglob("*.py")) for n in _imports(p)
                 if n == "recipes" or n.startswith("recipes.") or n.startswith("hydra")]
    assert not offenders, offenders


# ------------------------------------------------------------------ registries
def _choices_in_comment(field: str) -> set[str]:
    """The names a PruneConfig field's comment offers: ``# [csp:] a (note) | b | c`` → {a, b, c}."""
    source = (REPO / "csprune/train/config.py").read_text()
    line = next(l for l in source.splitlines() if re.match(rf"\s+{field}: ", l))
    comment = line.split("#", 1)[1].strip()
    if comment.startswith("csp:"):
        comment = comment[len("csp:"):]
    return {part.split()[0] for part in comment.split("|")}


def test_every_offered_name_is_registered_and_every_registered_name_is_offered():
    from csprune.methods import METHODS
    from csprune.methods.sensing import SENSINGS
    from csprune.pruner import SCOPES
    from csprune.schedules import SCHEDULES
    from csprune.solvers import SOLVER_OPTIONS, SOLVERS
    from csprune.train.config import METHOD_ALIASES, method_names

    # Configs: one conf/prune file per method name, and nothing else.
    files = {p.stem for p in (REPO / "conf/prune").glob("*.yaml")}
    assert files == set(method_names()), (files, method_names())
    assert set(METHOD_ALIASES.values()) <= set(METHODS)
    # The schema's comments list exactly the registered choices.
    for field, registry in (("method", set(method_names())), ("schedule", set(SCHEDULES)), ("scope", set(SCOPES)),
                            ("sensing", set(SENSINGS)), ("solver", set(SOLVERS) | {"auto"})):
        assert _choices_in_comment(field) == registry, (field, _choices_in_comment(field) ^ registry)
    # Every solver has an options entry, and solve() refuses anything else.
    assert set(SOLVER_OPTIONS) == set(SOLVERS)
    # The README's method and solver lists name the registries' entries.
    readme = (REPO / "README.md").read_text()
    for cls in METHODS.values():
        assert f"`{cls.__name__}`" in readme, cls.__name__
    for name in SOLVERS:
        assert f"`{name}`" in readme, name


def test_every_method_constructor_argument_is_reachable_from_the_prune_config():
    from csprune.methods import METHODS
    from csprune.train.config import PruneConfig, build_method, method_arguments

    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    for name in METHODS:
        missing = set(method_arguments(name)) - fields
        assert not missing, (name, missing)
    csp = build_method(dict(dataclasses.asdict(PruneConfig()), method="csp", safeguard=False, solver="obs",
                            solver_options={"rounds": 4}))
    assert csp.safeguard is False and csp.solver == "obs" and csp.solver_options == {"rounds": 4}


def test_a_misspelled_solver_option_fails_at_validation_naming_it():
    import pytest

    from csprune.errors import ConfigError
    from csprune.train.config import validate_prune_config

    with pytest.raises(ConfigError, match=r"prune\.solver_options=.*unknown option\(s\) \['atoms_per_itr'\] for solver 'omp'"):
        validate_prune_config({"sparsity": 0.5, "solver": "omp", "solver_options": {"atoms_per_itr": 2}})
    with pytest.raises(ConfigError, match=r"keys are solver names"):
        validate_prune_config({"sparsity": 0.5, "solver": "auto", "solver_options": {"rounds": 2}})
    validate_prune_config({"sparsity": 0.5, "solver": "auto", "solver_options": {"obs": {"rounds": 2}}})


def test_solver_tiers_run_upward_kernel_function_class():
    """Each solver module's class calls its own function tier (after the shared checks), never ``solve``
    back from the package; and gives what ``solve`` gives."""
    import torch

    from csprune.solvers import FISTA, OBS, OMP, SparseGPT, solve

    for module in ("omp", "obs", "sparsegpt", "fista"):
        names = _imports(REPO / f"csprune/solvers/{module}.py")
        assert "csprune.solvers.solve" not in names, module
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    gram = x.T @ x / 200 + 0.01 * torch.eye(12, dtype=torch.float64)
    xy = torch.randn(5, 12, generator=gen, dtype=torch.float64) @ gram
    for cls, name in ((OMP, "omp"), (OBS, "obs"), (SparseGPT, "sparsegpt")):
        torch.testing.assert_close(cls()(gram, xy, 4).coef, solve(gram, xy, k=4, solver=name).coef)
    torch.testing.assert_close(FISTA()(gram, xy, k=4).coef, solve(gram, xy, k=4, solver="fista").coef)
