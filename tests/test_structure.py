"""The package's shape: every module imports on its own, and the light ones stay light."""
import ast
import os
import pkgutil
import subprocess
import sys

import pytest

import onlinemix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(m.name for m in pkgutil.walk_packages(onlinemix.__path__, "onlinemix."))
HEAVY = ("timm", "diffusers", "transformers", "peft", "accelerate")


def fresh_interpreter(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    """No import cycle and no hidden import order: each module, first thing in a new process."""
    assert "onlinemix.ring" in MODULES and "onlinemix.generator.worker" in MODULES
    code = ("import importlib, subprocess, sys\n"
            f"for name in {MODULES!r}:\n"
            "    done = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
            "    if done.returncode:\n"
            "        print(name, done.stderr.strip().splitlines()[-1])\n")
    assert fresh_interpreter(code) == "", "modules that fail to import on their own"


@pytest.mark.parametrize("modules", [
    ("onlinemix.ring", "onlinemix.sources", "onlinemix.labels", "onlinemix.batch", "onlinemix.feedback"),
    ("onlinemix.pool",),
    ("onlinemix",),
])
def test_processes_that_attach_to_the_ring_import_no_model_library(modules):
    """A generator or DataLoader worker attaching to the ring must start fast: no timm, diffusers, transformers."""
    code = "".join(f"import {m}\n" for m in modules) + f"import sys\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    assert fresh_interpreter(code).strip() == "[]"


def test_the_package_face_names_resolve_lazily():
    code = ("import sys, onlinemix\n"
            "assert 'timm' not in sys.modules\n"
            "assert onlinemix.DiffMix.__module__ == 'onlinemix.transform' and 'timm' in sys.modules\n"
            "print(sorted(n for n in onlinemix.__all__ if not hasattr(onlinemix, n)))")
    assert fresh_interpreter(code).strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        onlinemix.Nothing


def test_long_modules_say_why_they_are_long():
    """Past ~400 lines a module's docstring must say why it stays one module."""
    long = []
    for path in [os.path.join(ROOT, "train.py")] + [
            os.path.join(folder, name) for folder, _, files in os.walk(os.path.join(ROOT, "onlinemix"))
            for name in files if name.endswith(".py")]:
        with open(path) as f:
            text = f.read()
        if text.count("\n") > 420 and "one module because" not in text.split('"""')[1]:
            long.append(os.path.relpath(path, ROOT))
    assert not long, f"long modules whose docstring does not say why: {long}"


def test_train_py_stays_a_recipe_a_newcomer_reads():
    """train.py is wiring read top to bottom: options, recording and the algorithms live in onlinemix."""
    with open(os.path.join(ROOT, "train.py")) as f:
        lines = f.read().count("\n")
    assert lines <= 300, f"train.py has {lines} lines; move what is not the recipe into onlinemix"


def test_the_architecture_map_names_every_module():
    """Every module file with code in it has its line in ARCHITECTURE.md's module map."""
    with open(os.path.join(ROOT, "ARCHITECTURE.md")) as f:
        architecture = f.read()
    missing = []
    for folder, _, files in os.walk(os.path.join(ROOT, "onlinemix")):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".py"):
                continue
            with open(path) as f:
                body = ast.parse(f.read()).body
            if len(body) > 1 or (body and not isinstance(body[0], ast.Expr)):  # package markers aside
                relative = os.path.relpath(path, ROOT)
                if f"`{relative}`" not in architecture:
                    missing.append(relative)
    assert not missing, f"ARCHITECTURE.md's module map lacks {missing}"
