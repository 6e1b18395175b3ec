"""What a fresh checkout needs to run the README's commands: the dependencies the main job
uses, documentation that stays inside the repository, and a build that a second
`pip install -e .` reuses."""
import importlib.util
import shutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_the_main_job_has_its_dependencies():
    """`pip install -e . && python -m fusedres` checks and benchmarks torchvision's models:
    torchvision is a dependency (a range, as torch), not an extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert {"torch", "torchvision", "numpy"} <= names


@pytest.mark.parametrize("doc", ["README.md", "ARCHITECTURE.md"])
def test_docs_stay_in_the_repository(doc):
    text = (ROOT / doc).read_text()
    assert "../shared" not in text and "DESIGN.md" not in text


@pytest.fixture
def setup_module(tmp_path, monkeypatch):
    """setup.py loaded as a module (main() does not run), building from a copy of csrc/."""
    spec = importlib.util.spec_from_file_location("fusedres_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    monkeypatch.setattr(module, "HERE", str(tmp_path))
    return module


def test_build_key_follows_every_input(setup_module, tmp_path):
    """The reuse of a cached build is keyed on every source and header: the same inputs give
    the same key (a second install reuses the build), any edit a new one."""
    from torch.utils.cpp_extension import CppExtension

    def key():
        ext = CppExtension("fusedres._C", setup_module.sources("csrc/cpu/*.cpp"),
                           extra_compile_args={"cxx": setup_module.CXX_FLAGS})
        return setup_module.build_key(ext)

    first = key()
    assert key() == first
    header = tmp_path / "csrc" / "common.h"
    original = header.read_text()
    header.write_text(original + "\n// an edit\n")
    assert key() != first
    header.write_text(original)
    assert key() == first
    source = next((tmp_path / "csrc" / "cpu").glob("*.cpp"))
    source.write_text(source.read_text() + "\n")
    assert key() != first


def test_mutation_catalog_applies():
    """Every mutation of tools/mutations.py still finds its text exactly once in the sources
    (a catalog entry that no longer applies would be reported as an error, not a kill)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "tools" / "mutate.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "mutations apply" in done.stdout


def test_op_index_matches_the_tree():
    """The op index at the top of csrc/fusedres.cpp names every op whose schema is defined
    there (and the Triton-only ones), and every path it gives exists."""
    import re

    from fusedres._ops import NAMESPACE_OPS
    text = (ROOT / "csrc" / "fusedres.cpp").read_text()
    index = text[text.index("// OP INDEX"):text.index("#include")]
    listed = set(re.findall(r"^// (?:\(Triton only\) )?([a-z_0-9]+)\s{2,}", index, re.M))
    schemas = set(re.findall(r'm\.def\(\s*"([a-z_0-9]+)\(', text))
    assert schemas, "no schema found"
    ops = schemas | set().union(*NAMESPACE_OPS.values())
    assert ops <= listed, f"ops missing from the index: {sorted(ops - listed)}"
    assert listed <= ops, f"the index lists ops that do not exist: {sorted(listed - ops)}"
    paths = set(re.findall(r"\b((?:csrc|kernels|fusedres|tests)/[\w/]+\.(?:cpp|cu|h|py))", index))
    assert paths
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing, f"the index names files that do not exist: {missing}"
