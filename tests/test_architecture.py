"""The import rules of docs/ARCHITECTURE.md hold for ``src/tar_lightning`` (checked by ``tests/architecture.py``).

Each rule is also checked against a small package written here that breaks it, so the checker itself is known
to see a circle, a private import, an own import hidden in a function, an unmarked lazy third-party import and
an upward import.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from architecture import analyse, floor_of


@pytest.fixture(scope="module")
def report():
    return analyse()


def test_no_import_circles(report):
    assert report.circles() == []


def test_no_private_names_imported_across_modules(report):
    assert [f"{i.where(report.root)} {i.names}" for i in report.private_imports()] == []


def test_no_own_code_imported_inside_a_function(report):
    assert [i.where(report.root) for i in report.hidden_own_imports()] == []


def test_lazy_third_party_imports_are_optional_dependencies_and_say_so(report):
    assert [f"{i.where(report.root)} {i.target}" for i in report.unmarked_third_party_in_functions()] == []


def test_no_module_imports_a_higher_floor(report):
    assert [f"{i.where(report.root)} -> {i.target}" for i in report.upward_imports()] == []


def test_every_module_has_a_floor(report):
    assert [m for m in report.modules if floor_of(m) is None] == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "tar_lightning"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_checker_sees_each_kind_of_break(tmp_path):
    root = _package(tmp_path, {
        "errors.py": "from tar_lightning.models import load\n",            # circle errors <-> models, upward 0 -> 1
        "models.py": "from tar_lightning.errors import _hidden\n"          # private name across modules
                     "def load():\n"
                     "    from tar_lightning import losses\n"               # own import inside a function
                     "    import peft\n"                                    # unmarked lazy third-party import
                     "    # optional dependency: the [gguf] extra\n"
                     "    import gguf\n",                                   # marked: allowed
        "losses.py": "from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n"
                     "    from tar_lightning.models import load\n",       # type-only: no edge
    })
    r = analyse(root)
    assert r.circles() == [["tar_lightning.errors", "tar_lightning.models"]]
    assert [i.names for i in r.private_imports()] == [("_hidden",)]
    assert [(i.module, i.target) for i in r.hidden_own_imports()] == [("tar_lightning.models", "tar_lightning.losses")]
    assert [i.target for i in r.unmarked_third_party_in_functions()] == ["peft"]
    assert [(i.module, i.target) for i in r.upward_imports()] == [("tar_lightning.errors", "tar_lightning.models")]
