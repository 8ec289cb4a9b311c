"""family= / operands= on the pam ops, the op-level mode and pam.convert (pam.families).

The kernels of each family are pinned to NumPy references in tests/test_families.py;
here the references are built independently of them: L-Mul from the paper's formula in
exact rational arithmetic, the operand rounding from torch's own casts (exact round to
nearest even integer code), the float family from torch's float32 ops.
"""
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pam
from pam import families as FAM

FORMAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                 "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MIN_NORMAL = {"float32": 2.0 ** -126, "bfloat16": 2.0 ** -126, "float16": 2.0 ** -14,
              "e4m3": 2.0 ** -6, "e5m2": 2.0 ** -14}


def bits(t):
    return t.contiguous().view(torch.int32)


def assert_same_bits(a, b):
    assert a.shape == b.shape
    assert torch.equal(bits(a), bits(b)), (a, b)


def round_ref(x, fmt, flush):
    """x rounded to ``fmt`` with torch's casts (e4m3 saturating: clamped first)."""
    if fmt == "float32":
        q = x.clone()
    else:
        y = x.clamp(-448.0, 448.0) if fmt == "e4m3" else x
        q = y.to(FORMAT_DTYPES[fmt]).float()
    if flush:
        q = torch.where(q.abs() < MIN_NORMAL[fmt], torch.zeros_like(q).copysign(q), q)
    return q


def lmul_ref_scalar(a, b, mant_bits):
    """L-Mul of two float32 values by the paper's formula, exact, rounded once to float32."""
    a, b = np.float32(a), np.float32(b)
    negative = bool(np.signbit(a)) != bool(np.signbit(b))
    if abs(a) < 2.0 ** -126 or abs(b) < 2.0 ** -126:      # zeros and subnormals count as 0
        return np.float32(-0.0 if negative else 0.0)
    ell = FAM.lmul_l(mant_bits)
    ma, ea = np.frexp(abs(np.float64(a)))       # |a| = ma 2^ea, ma in [0.5, 1)
    mb, eb = np.frexp(abs(np.float64(b)))
    xm, ym = Fraction(ma) * 2 - 1, Fraction(mb) * 2 - 1      # mantissa fractions in [0, 1)
    value = (1 + xm + ym + Fraction(1, 2 ** ell)) * Fraction(2) ** (int(ea) + int(eb) - 2)
    r = np.float32(float(value))       # value has <= 26 significant bits: float() is exact
    return -r if negative else r


def random_normals(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


# ----------------------------------------------------------------------------- resolve
def test_resolve_checks_names_and_offsets():
    with pytest.raises(ValueError, match="family must be one of"):
        FAM.resolve("bogus")
    with pytest.raises(ValueError, match="operands must be one of"):
        FAM.resolve("pam", "int8")
    with pytest.raises(ValueError, match="takes no offset"):
        FAM.resolve("lmul", offset=1.0552)
    with pytest.raises(ValueError, match="takes no offset"):
        pam.mul(torch.ones(2), torch.ones(2), family="float", offset=1.1)
    assert FAM.resolve("pam_offset").offset == FAM.KOSSON_JAGGI_OFFSET
    assert FAM.resolve("pam_offset", offset=1.1).offset == 1.1
    # l(m) of the paper: m <= 3 -> m, m = 4 -> 3, m > 4 -> 4
    assert [FAM.lmul_l(m) for m in (2, 3, 4, 5, 7, 10, 23)] == [2, 3, 3, 4, 4, 4, 4]
    assert FAM.resolve("lmul", "e4m3").off == 1 << 20
    assert FAM.resolve("lmul", "float32").off == 1 << 19


def test_pam_offset_is_pam_with_kosson_jaggi_offset():
    a, b = random_normals((64,), 0), random_normals((64,), 1)
    assert_same_bits(pam.mul(a, b, family="pam_offset"), pam.mul(a, b, offset=1.0552))
    A, B = random_normals((5, 7), 2), random_normals((7, 3), 3)
    assert_same_bits(pam.matmul(A, B, family="pam_offset"), pam.matmul(A, B, offset=1.0552))


# ----------------------------------------------------------------------------- rounding
@pytest.mark.parametrize("fmt", list(FORMAT_DTYPES))
def test_operand_rounding_matches_torch_casts(fmt):
    x = torch.cat([random_normals((2000,), 4, 1.0), random_normals((500,), 5, 1e-3),
                   random_normals((500,), 6, 1e4),
                   torch.tensor([0.0, -0.0, 448.0, 460.0, 464.0, 500.0, -1e6, 65504.0,
                                 65519.0, 65520.0, 57344.0, 61439.0, 61440.0, 2.0 ** -9,
                                 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -24, 2.0 ** -25,
                                 float("inf"), float("-inf")])])
    for flush in (False, True):
        got = FAM.round_to(x, fmt, flush)
        assert_same_bits(got, round_ref(x, fmt, flush))
    assert torch.isnan(FAM.round_to(torch.tensor([float("nan")]), fmt)).all()


def test_e4m3_saturates_and_e5m2_overflows_to_inf():
    x = torch.tensor([449.0, 1e30, float("inf"), -float("inf")])
    assert FAM.round_to(x, "e4m3").tolist() == [448.0, 448.0, 448.0, -448.0]
    assert FAM.round_to(torch.tensor([61440.0, 1e30]), "e5m2").tolist() == \
        [float("inf"), float("inf")]


@pytest.mark.parametrize("fmt", ["bfloat16", "float16", "e4m3", "e5m2"])
@pytest.mark.parametrize("family", ["pam", "pam_offset", "lmul"])
def test_narrow_products_are_products_of_the_rounded_operands(fmt, family):
    a = torch.cat([random_normals((300,), 7), torch.tensor([2.0 ** -8, -3e-3, 0.0])])
    b = torch.cat([random_normals((300,), 8), torch.tensor([1.5, 2.0, 7.0])])
    qa, qb = round_ref(a, fmt, True), round_ref(b, fmt, True)
    want = pam.mul(qa, qb, family=family) if family != "lmul" else None
    got = pam.mul(a, b, family=family, operands=fmt)
    if family == "lmul":
        # l follows the operand format, so compare with the formula at that l
        m = FAM.FORMATS[fmt].mant_bits
        want = torch.tensor([lmul_ref_scalar(x, y, m) for x, y in zip(qa.tolist(), qb.tolist())],
                            dtype=torch.float32)
    assert_same_bits(got, want)


def test_gradient_passes_straight_through_the_rounding():
    a = random_normals((50,), 9).requires_grad_()
    b = random_normals((50,), 10)
    g = random_normals((50,), 11)
    pam.mul(a, b, operands="e4m3", backward="approx").backward(g)
    assert_same_bits(a.grad, pam.mul(g, round_ref(b, "e4m3", True)))


# ----------------------------------------------------------------------------- L-Mul
def test_lmul_mul_matches_the_paper_formula():
    a = torch.cat([random_normals((400,), 12), torch.tensor([1.0, 1.5, 1.999, -1.75, 3.0])])
    b = torch.cat([random_normals((400,), 13), torch.tensor([1.0, 1.5, 1.999, 1.75, -0.75])])
    got = pam.mul(a, b, family="lmul")
    want = torch.tensor([lmul_ref_scalar(x, y, 23) for x, y in zip(a.tolist(), b.tolist())],
                        dtype=torch.float32)
    assert_same_bits(got, want)
    # the paper's formula and the integer adder (PAM with offset 1 + 2^-4) differ exactly
    # where the mantissas carry: x_m + y_m + 2^-4 >= 1
    adder = pam.mul(a, b, family="pam_offset", offset=1 + 2 ** -4)
    ma = torch.frexp(a.abs())[0] * 2 - 1
    mb = torch.frexp(b.abs())[0] * 2 - 1
    carry = (ma.double() + mb.double() + 2 ** -4) >= 1
    assert torch.equal(bits(got) != bits(adder), carry)


def _matmul_lmul_ref(A, B, mant_bits=23):
    n, k = A.shape
    m = B.shape[1]
    out = np.zeros((n, m), dtype=np.float32)
    for i in range(n):
        for j in range(m):
            acc = np.float32(0.0)
            for t in range(k):
                acc = np.float32(acc + lmul_ref_scalar(A[i, t], B[t, j], mant_bits))
            out[i, j] = acc
    return torch.from_numpy(out)


def _pow2(x):
    """sign(x) 2^E(x) (zero for zero), from frexp: exact."""
    m, e = torch.frexp(x)
    return torch.where(x == 0, torch.zeros_like(x), torch.ldexp(torch.sign(m) * 0.5, e))


def test_lmul_matmul_forward_and_both_backwards():
    A = random_normals((5, 9), 14).requires_grad_()
    B = random_normals((9, 4), 15).requires_grad_()
    G = random_normals((5, 4), 16)
    C = pam.matmul(A, B, family="lmul", backward="exact")
    assert_same_bits(C, _matmul_lmul_ref(A.detach().numpy(), B.detach().numpy()))
    C.backward(G)
    # exact: dC/dA_it = sign(B_tj) 2^E(B_tj); PAM by a power of two is exact
    assert_same_bits(A.grad, pam.matmul(G, _pow2(B.detach()).t()))
    assert_same_bits(B.grad, pam.matmul(_pow2(A.detach()).t(), G))
    A.grad = B.grad = None
    pam.matmul(A, B, family="lmul", backward="approx").backward(G)
    assert_same_bits(A.grad, _matmul_lmul_ref(G.numpy(), B.detach().t().numpy()))
    assert_same_bits(B.grad, _matmul_lmul_ref(A.detach().t().numpy(), G.numpy()))


@pytest.mark.parametrize("family", ["pam", "lmul"])
def test_conv_1x1_equals_matmul_in_every_family(family):
    """A 1x1 convolution sums over input channels in increasing order, as matmul over k."""
    x = random_normals((2, 6, 3, 3), 17).requires_grad_()
    w = random_normals((4, 6, 1, 1), 18).requires_grad_()
    y = pam.conv2d(x, w, family=family, operands="bfloat16")
    x2 = x.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    want = pam.matmul(x2, w.detach().reshape(4, 6).t(), family=family, operands="bfloat16")
    assert_same_bits(y.permute(0, 2, 3, 1).reshape(-1, 4), want)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


# ----------------------------------------------------------------------------- float
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "e4m3"])
def test_float_family_is_torch_on_rounded_operands(fmt):
    A, B = random_normals((6, 8), 19), random_normals((8, 5), 20)
    qa, qb = round_ref(A, fmt, False), round_ref(B, fmt, False)
    assert_same_bits(pam.matmul(A, B, family="float", operands=fmt), qa @ qb)
    assert_same_bits(pam.mul(A, A, family="float", operands=fmt), qa * qa)
    x, w = random_normals((1, 2, 5, 5), 21), random_normals((3, 2, 3, 3), 22)
    assert_same_bits(pam.conv2d(x, w, family="float", operands=fmt),
                     F.conv2d(round_ref(x, fmt, False), round_ref(w, fmt, False)))


def test_float_family_inside_a_pam_block_is_refused():
    with pam.arithmetic():
        with pytest.raises(ValueError, match="family='float' inside"):
            pam.mul(torch.ones(2), torch.ones(2), family="float")


# ----------------------------------------------------------------------------- mode/convert
def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3))


@pytest.mark.parametrize("family,fmt", [("lmul", "float32"), ("pam_offset", "bfloat16"),
                                        ("pam", "e5m2")])
def test_mode_equals_convert_for_each_family(family, fmt):
    x, y = random_normals((10, 8), 23), torch.arange(10) % 3
    m1, m2 = _mlp(0), _mlp(0)
    with pam.arithmetic(family=family, operands=fmt, backward="exact"):
        F.cross_entropy(m1(x), y).backward()
    pam.convert(m2, family=family, operands=fmt)
    off = FAM.resolve(family, fmt).offset
    loss = pam.nn.functional.cross_entropy(m2(x), y, offset=off)
    loss.backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert_same_bits(p1.grad, p2.grad)


def test_mode_float_family_rounds_matrix_operands_only():
    m = _mlp(1)
    x = random_normals((4, 8), 24)
    with pam.arithmetic(family="float", operands="e4m3"):
        got = m(x)
    def linear(x, layer):
        return round_ref(x, "e4m3", False) @ round_ref(layer.weight, "e4m3", False).t() \
            + layer.bias
    h = F.layer_norm(F.gelu(linear(x, m[0])), (16,), m[2].weight, m[2].bias)
    want = linear(h, m[3])
    assert_same_bits(got.detach(), want.detach())


def test_audit_reports_the_float_family():
    m = _mlp(2)
    x, y = random_normals((2, 8), 25), torch.tensor([0, 1])
    with pytest.raises(pam.audit.FloatMultiplyError):
        with pam.audit.no_float_multiply(), pam.arithmetic(family="float"):
            m(x)
    with pam.audit.no_float_multiply(), pam.arithmetic(family="lmul", operands="e4m3"):
        F.cross_entropy(m(x), y).backward()


def test_convert_float_family_replaces_only_matrix_layers():
    m = pam.convert(_mlp(3), family="float", operands="bfloat16")
    assert isinstance(m[0], pam.nn.Linear) and m[0].family == "float"
    assert type(m[2]) is nn.LayerNorm and type(m[1]) is nn.GELU
    m = pam.convert(_mlp(3), family="lmul", operands="e4m3")
    assert isinstance(m[2], pam.nn.LayerNorm) and m[3].operands == "e4m3"
    assert "family='lmul'" in repr(m[0])


def test_spec_round_trips_family_and_operands():
    ctx = pam.arithmetic(family="lmul", operands="e5m2")
    assert pam.arithmetic(**ctx.spec).cfg.multiplier == ctx.cfg.multiplier


@pytest.mark.parametrize("family", FAM.FAMILIES)
def test_every_family_trains(family):
    torch.manual_seed(0)
    m = _mlp(4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = random_normals((64, 8), 26)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    losses = []
    for _ in range(15):
        with pam.arithmetic(family=family, operands="bfloat16"):
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
