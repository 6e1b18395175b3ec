"""Choosing a backend, fusedres.info(), and falling back when an extension cannot load."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fusedres
import fusedres.functional as FF
from conftest import HAS_TRITON, assert_close, make

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env):
    """Runs code in a fresh interpreter (import-time behaviour), returns (stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def test_set_get_and_context_manager():
    fusedres.set_backend("reference")
    assert fusedres.get_backend() == "reference"
    with fusedres.backend("cpp"):
        assert fusedres.get_backend() == "cpp"
        with fusedres.backend("auto"):
            assert fusedres.get_backend() == "auto"
        assert fusedres.get_backend() == "cpp"
    assert fusedres.get_backend() == "reference"


def test_context_manager_restores_after_an_error():
    fusedres.set_backend("auto")
    with pytest.raises(KeyError):
        with fusedres.backend("reference"):
            raise KeyError
    assert fusedres.get_backend() == "auto"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'.*auto, reference, cpp, cuda, triton"):
        fusedres.set_backend("fast")
    with pytest.raises(ValueError, match="unknown backend"):
        with fusedres.backend("nope"):
            pass


def test_backend_that_cannot_run_says_why():
    x = make((2, 3, 4, 4))
    with fusedres.backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this op"):
            FF.add_relu(x, x)
    with fusedres.backend("triton"):
        with pytest.raises(TypeError, match="Triton convolution takes float16, bfloat16 or float32"):
            FF.conv_bias_relu(x.double(), make((3, 3, 1, 1), dtype=torch.float64))


def test_triton_on_cpu_needs_the_interpreter():
    out, _ = run_python(
        """
        import torch, fusedres
        import fusedres.functional as FF
        print(fusedres.info()["unavailable_reasons"].get("triton"))
        with fusedres.backend("triton"):
            try:
                FF.add_relu(torch.randn(2, 3), torch.randn(2, 3))
            except RuntimeError as e:
                print("raised:", e)
        """,
        TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="",
    )
    assert "TRITON_INTERPRET=1" in out and "raised: fusedres: backend 'triton' cannot run" in out


@pytest.mark.parametrize("name", ["reference", "cpp", "auto"])
def test_every_cpu_backend_gives_the_reference_result(name):
    x = make((3, 4, 5, 5), scale=2.0)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    with fusedres.backend(name):
        out = FF.batch_norm_relu(x, rm.clone(), rv.clone(), training=True)
        out_eval = FF.batch_norm_relu(x, rm, rv, training=False)
    assert_close(out, torch.relu(F.batch_norm(x.double(), None, None, training=True)), torch.float32)
    assert_close(out_eval, torch.relu(F.batch_norm(x.double(), rm.double(), rv.double())),
                 torch.float32)


def test_info_reports_build_load_and_active():
    info = fusedres.info()
    assert info["torch"] == torch.__version__
    assert info["loaded"]["cpp"] and info["available"]["cpp"] and info["available"]["reference"]
    assert info["available"]["cuda"] == (info["loaded"]["cuda"] and torch.cuda.is_available())
    assert info["available"]["triton"] == HAS_TRITON
    assert info["loaded"]["triton"] == (info["errors"]["triton"] is None)
    assert info["active"] == fusedres.get_backend()
    assert info["resolved"]["cpu"] == "cpp"
    with fusedres.backend("reference"):
        assert fusedres.info()["resolved"]["cpu"] == "reference"


def test_environment_variable_sets_the_backend():
    out, _ = run_python("import fusedres; print(fusedres.get_backend())", FUSEDRES_BACKEND="reference")
    assert out.strip() == "reference"
    out, err = run_python("import fusedres; print(fusedres.get_backend())", FUSEDRES_BACKEND="bogus")
    assert out.strip() == "auto" and "FUSEDRES_BACKEND='bogus' is not a backend" in err


def test_broken_extension_warns_once_and_falls_back():
    """As after a torch upgrade that breaks the ABI: import works, warns with the reason and the
    rebuild command, and 'auto' runs the reference implementation."""
    out, err = run_python(
        """
        import sys, warnings
        sys.modules["fusedres._C"] = None  # any import of it now fails
        warnings.simplefilter("always")
        import torch, fusedres
        import fusedres.functional as FF
        x = torch.randn(2, 3, 4, 4)
        y = FF.batch_norm_relu(x, None, None, training=True)
        ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, training=True))
        info = fusedres.info()
        print(torch.allclose(y, ref, atol=1e-6), info["loaded"]["cpp"], info["resolved"]["cpu"])
        """
    )
    assert out.split() == ["True", "False", "reference"]
    assert err.count("could not be loaded") == 1
    assert "pip install -e . --no-build-isolation" in err


def test_op_checks_run_in_ieee_float32_and_restore_tf32(monkeypatch):
    """`python -m fusedres` checks float32 convolutions against 1e-4: under PyTorch's default
    TF32 (GPUs since Ampere) it would report FAILED. The checks run with TF32 off; the user's
    setting is restored."""
    import fusedres.__main__ as cli

    seen = []
    real_checks = cli.checks

    def checks(*args):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        yield from real_checks(*args)

    monkeypatch.setattr(cli, "checks", checks)
    # (conftest turns TF32 off for the tests; the user's default is on.)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert cli.main(["--ops-only", "--backend", "cpp"]) == 0
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    assert seen and all(s == (False, False) for s in seen)
