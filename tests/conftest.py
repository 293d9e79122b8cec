"""Test set-up: Triton kernels run in the CPU interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before triton's @jit decorators run (at fastalign's import), so it is
set here, at collection time, before any test module imports fastalign.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _check_interpreter_numpy() -> None:
    """Triton <= 3.6's interpreter calls int() on 1-element arrays, which NumPy >= 2.4 refuses."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton

    tv = tuple(int(x) for x in triton.__version__.split(".")[:2])
    nv = tuple(int(x) for x in numpy.__version__.split(".")[:2])
    if tv < (3, 7) and nv >= (2, 4):
        raise pytest.UsageError(
            f"the Triton {triton.__version__} interpreter fails with NumPy {numpy.__version__} "
            "('only 0-dimensional arrays can be converted to Python scalars'); "
            "use triton >= 3.7 or pip install 'numpy<2.4'"
        )


_check_interpreter_numpy()


def _interpreter_rounds_bf16_to_nearest_even() -> None:
    """The GPU converts fp32 -> bf16 by rounding to nearest even; the Triton interpreter truncates
    (it ignores the rounding mode for that pair), a one-ulp bias in every bf16 result the CPU tests
    would check against the GPU's error bar. Give the interpreter the GPU's rounding (NaN stays NaN)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    if not all(hasattr(interp, n) for n in ("InterpreterBuilder", "TensorHandle")):
        raise pytest.UsageError(
            "this Triton's interpreter has no InterpreterBuilder.cast_impl to correct "
            "(fp32 -> bf16 rounding); update tests/conftest.py"
        )
    cast = interp.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float64 and dst_type.scalar == tl.bfloat16:
            # the interpreter casts the fp64 values to bf16's uint16 storage as integers (NaN / garbage;
            # e.g. kl_penalty's d ref_logp with fp64 logp and bf16 ref_logp): go through fp32 (RNE each)
            src = interp.TensorHandle(np.asarray(src.data, dtype=np.float64).astype(np.float32), tl.float32)
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
            return interp.TensorHandle(out, dst_type.scalar)
        return cast(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_impl


_interpreter_rounds_bf16_to_nearest_even()


def _hypothesis_profiles() -> None:
    """Property tests (tests/test_properties.py): HYPOTHESIS_PROFILE=ci (the default: a few examples per
    property, the whole suite in about a minute on two cores, derandomized and without an example
    database, so every run draws the same cases) or nightly (deep: many random examples)."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the `test` extra installs it; without it only test_properties.py fails
        return
    slow = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile(
        "ci", max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=slow
    )
    settings.register_profile(
        "nightly", max_examples=1000, deadline=None, derandomize=False, suppress_health_check=slow
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_hypothesis_profiles()

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
