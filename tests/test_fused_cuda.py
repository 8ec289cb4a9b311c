"""Fused CUDA kernels (pam.kernels.cuda) against the CPU ones, bit for bit (simulator)."""
import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")

from numba import cuda  # noqa: E402

if not cuda.is_available():
    pytest.skip("no CUDA GPU and the CUDA simulator is off", allow_module_level=True)

from pam import dispatch, optim_bits as OB  # noqa: E402
from pam.kernels import cpu  # noqa: E402
from pam.kernels import cuda as K  # noqa: E402

F32 = np.finfo(np.float32)


def _arrays(rng, n, k):
    out = []
    for _ in range(k):
        x = (rng.standard_normal(n) * 0.1).astype(np.float32)
        x[::17] = 0.0
        x[5::23] = F32.tiny / 4                      # subnormal: counts as zero
        out.append(x.view(np.int32))
    out[3 if k > 3 else 0] = np.abs(out[3 if k > 3 else 0].view(np.float32)).view(np.int32)
    return out


@pytest.mark.parametrize("flags", [0, OB.ADAMW_DECAY, OB.ADAMW_AMSGRAD | OB.ADAMW_MAXIMIZE])
@pytest.mark.parametrize("offset", [None, 1.0552])
def test_adamw_matches_cpu(flags, offset):
    rng = np.random.default_rng(flags)
    arrs = _arrays(rng, 300, 5)
    sc = OB.adamw_scalars(1e-2, 0.9, 0.98, 1e-8, 0.05, 3)
    off = dispatch.offset_constant(offset)
    a, b = [x.copy() for x in arrs], [x.copy() for x in arrs]
    K.adamw(*a, *sc, off, flags)
    cpu.adamw(*b, *sc, off, flags)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], arrs[0])         # something was updated


@pytest.mark.parametrize("flags", [0, OB.SGD_MOMENTUM | OB.SGD_FIRST | OB.SGD_DECAY,
                                   OB.SGD_MOMENTUM | OB.SGD_DAMPENING | OB.SGD_MAXIMIZE,
                                   OB.SGD_MOMENTUM | OB.SGD_NESTEROV])
def test_sgd_matches_cpu(flags):
    rng = np.random.default_rng(flags + 7)
    arrs = _arrays(rng, 300, 3)
    sc = (OB.f32_bits(0.1), OB.f32_bits(1e-3), OB.f32_bits(0.9), OB.f32_bits(0.7))
    a, b = [x.copy() for x in arrs], [x.copy() for x in arrs]
    K.sgd(*a, *sc, dispatch.offset_constant(1.0552), flags)
    cpu.sgd(*b, *sc, dispatch.offset_constant(1.0552), flags)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_fused_shape_errors_name_the_array():
    x = np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="m must have 4 elements"):
        K.adamw(x, x, np.zeros(3, np.int32), x, x, *([0] * 8), 0, 0)


def test_every_cuda_kernel_has_a_cpu_twin():
    """Every public CUDA kernel (internal fast-path and range-check kernels excepted)."""
    public = set(K.__all__) & set(K.KERNEL_FUNCTIONS)
    assert {"mul", "matmul", "adamw", "gelu_forward"} <= public
    for name in public:
        assert callable(getattr(K, name)) and callable(getattr(cpu, name)), name


@pytest.mark.parametrize("flags", [OB.ADAMW_DECAY, OB.ADAMW_AMSGRAD])
def test_adamw_unbiased_matches_cpu(flags):
    rng = np.random.default_rng(flags + 11)
    arrs = _arrays(rng, 300, 5)
    sc = OB.adamw_unbiased_scalars(1e-2, 0.9, 0.999, 1e-8, 0.05, 5)
    sq = dispatch.offset_constant(OB.UNBIASED_SQUARE_OFFSET)
    a, b = [x.copy() for x in arrs], [x.copy() for x in arrs]
    K.adamw_unbiased(*a, *sc, 0, sq, flags)
    cpu.adamw_unbiased(*b, *sc, 0, sq, flags)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_gelu_kernels_match_cpu():
    from pam.functional import GELU_KNOTS, GELU_SLOPE_CHANGES
    knots = np.array(GELU_KNOTS, np.float32).view(np.int32)
    slopes = np.array(GELU_SLOPE_CHANGES, np.float32).view(np.int32)
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-5, 5, 200).astype(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, *GELU_KNOTS],
                                 np.float32)]).view(np.int32)
    g = (rng.standard_normal(x.size) * 2).astype(np.float32).view(np.int32)
    a, b = np.empty_like(x), np.empty_like(x)
    K.gelu_forward(x, knots, slopes, a)
    cpu.gelu_forward(x, knots, slopes, b)
    assert np.array_equal(a, b)
    for exact in (True, False):
        K.gelu_backward(x, g, knots, slopes, exact, a)
        cpu.gelu_backward(x, g, knots, slopes, exact, b)
        assert np.array_equal(a, b)


def test_softmax_kernels_match_cpu():
    rng = np.random.default_rng(4)
    n = 7
    x = (rng.standard_normal(6 * n) * 3).astype(np.float32)
    x[:n] = -np.inf                                  # a fully masked row
    x[n + 2] = np.nan
    x[2 * n + 1] = np.inf
    x = x.view(np.int32)
    g = rng.standard_normal(x.size).astype(np.float32).view(np.int32)
    a, b = np.empty_like(x), np.empty_like(x)
    sa, sb = np.empty(2 * 6, np.int32), np.empty(2 * 6, np.int32)    # (m, s) per row
    for off in (0, dispatch.offset_constant(1.0552)):
        for safe in (False, True):
            K.softmax_forward(x, a, sa, n, off, safe)
            cpu.softmax_forward(x, b, sb, n, off, safe)
            assert np.array_equal(a, b)
            assert np.array_equal(sa, sb)
            for exact in (True, False):
                K.softmax_backward(x, g, sa, a, n, off, safe, exact)
                cpu.softmax_backward(x, g, sb, b, n, off, safe, exact)
                assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="must be positive and divide"):
        K.softmax_forward(x, a, sa, 5, 0, False)
    with pytest.raises(ValueError, match="stats must have 2 entries per row"):
        K.softmax_backward(x, g, sa[1:].copy(), a, n, 0, False, True)
    with pytest.raises(ValueError, match="stats must have 2 entries per row"):
        cpu.softmax_backward(x, g, sa[1:].copy(), a, n, 0, False, True)
