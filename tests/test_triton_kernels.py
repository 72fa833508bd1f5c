"""Triton kernels against their pure-torch twins, evaluated in float64.

Runs on the GPU when there is one, else on the CPU through the Triton interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported). The interpreter uses small
tiles (``triton_kernels.utils``), so these shapes span several tiles on every axis;
one test forces the GPU tile sizes on small shapes to cover their boundary masks, and
the last ones run the exact default tiles a GPU would get (split-K and its reduce too).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot run")

# the pure-torch twins (oracles) of the Triton ops
ref_gram = importlib.import_module("linft.ops.gram")
ref_jac = importlib.import_module("linft.ops.jacobian")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

# (dtype, rtol relative to the largest reference value)
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]
SENTINEL = 7.0


@pytest.fixture(autouse=True)
def _seed(request):
    digest = hashlib.sha256(request.node.nodeid.encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:4], "little"))


@pytest.fixture(scope="module")
def tk():
    try:
        import linft.triton_kernels as kernels
    except ImportError:
        root = str(Path(__file__).resolve().parents[1])
        if root not in sys.path:
            sys.path.insert(0, root)
        import triton_kernels as kernels
    return kernels


def assert_close_to_max(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what=""):
    """``|actual - expected| <= rtol * max|expected|`` everywhere; reports the worst element."""
    assert actual.shape == expected.shape, (
        f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a, e = actual.double().cpu(), expected.double().cpu()
    bad = ~torch.isfinite(a)
    assert not bad.any(), f"{what}: NaN/inf at {torch.nonzero(bad)[:5].tolist()}"
    scale = e.abs().max().clamp_min(1e-30)
    diff = (a - e).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst > rtol * float(scale):
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: max error {worst:.3e} > {rtol:.0e} * max|ref| ({float(scale):.3e}); "
            f"worst at {idx}: {float(a[idx]):.8e} vs {float(e[idx]):.8e}"
        )


def assert_signs(actual: torch.Tensor, expected_values: torch.Tensor, rtol: float, what=""):
    """``actual`` equals sign(expected) wherever the value is clearly away from zero."""
    a, e = actual.double().cpu(), expected_values.double().cpu()
    assert set(a.unique().tolist()) <= {-1.0, 0.0, 1.0}, f"{what}: values other than signs"
    clear = e.abs() > rtol * e.abs().max()
    wrong = clear & (a != torch.sign(e))
    assert clear.any(), f"{what}: no clear-cut values to compare"
    if wrong.any():
        idx = tuple(torch.nonzero(wrong)[0].tolist())
        raise AssertionError(f"{what}: {int(wrong.sum())} wrong signs, first at {idx}: "
                             f"{float(a[idx])} vs value {float(e[idx]):.3e}")  # fmt: skip


def test_tolerances_can_fail():
    ref = torch.randn(20, 20, dtype=torch.float64)
    bad = ref.clone()
    bad[3, 4] += 2e-5 * ref.abs().max()
    with pytest.raises(AssertionError, match=r"worst at \(3, 4\)"):
        assert_close_to_max(bad, ref, 1e-5)
    bad[3, 4] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_to_max(bad, ref, 1e-2)


# ----------------------------------------------------------------------------- Jacobians


def make_mask(n: int, T: int, kind: str) -> torch.Tensor | None:
    """None, or a mix of right padding, left padding, a hole and an empty sample."""
    if kind == "none":
        return None
    mask = torch.ones(n, T, dtype=torch.bool)
    for i in range(n):
        case = i % 4
        if case == 0:
            mask[i, 1::3] = False  # holes
        elif case == 1:
            mask[i, T - T // 2 :] = False  # right padding
        elif case == 2:
            mask[i, : T // 3 + 1] = False  # left padding
            mask[i, -1] = False
    if kind == "with_empty":
        mask[-1] = False
    return mask


def jac_inputs(n, C, T, d_in, d_out, dtype, mask_kind):
    x = torch.randn(n, T, d_in)
    g = torch.randn(n, C, T, d_out)
    mask = make_mask(n, T, mask_kind)
    if mask is not None:
        # padded activations may be NaN (fully masked attention rows): must not leak
        x[~mask] = float("nan")
        g.transpose(1, 2)[~mask] = float("inf")
    return (
        x.to(dtype).to(DEVICE),
        g.to(dtype).to(DEVICE),
        (None if mask is None else mask.to(DEVICE)),
    )


def reference_out(fn, x, g, *args, out, **kw):
    """The twin on float64 copies of the same (rounded) inputs, written into a copy of out."""
    expected = out.double().cpu()
    dbl = [a.double().cpu() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    mask = kw.pop("mask")
    fn(x.double().cpu(), g.double().cpu(), *dbl, mask=None if mask is None else mask.cpu(),
       out=expected, **kw)  # fmt: skip
    return expected


JAC_SHAPES = [  # n, C, T, d_in, d_out, r
    (3, 1, 7, 33, 19, 3),
    (4, 3, 18, 17, 40, 8),
]


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("mask_kind", ["none", "padded", "with_empty"])
@pytest.mark.parametrize("shape", JAC_SHAPES)
def test_lora_jacobian(tk, shape, mask_kind, dtype, rtol):
    n, C, T, d_in, d_out, r = shape
    x, g, mask = jac_inputs(n, C, T, d_in, d_out, dtype, mask_kind)
    A = torch.randn(r, d_in).to(dtype).to(DEVICE)
    B = torch.randn(d_out, r).to(dtype).to(DEVICE)
    col_A, col_B = 5, 5 + r * d_in + 2
    out = torch.full((n, C, col_B + d_out * r + 3), SENTINEL, device=DEVICE)
    tk.lora_jacobian(x, g, A, B, 0.75, mask, out, col_A, col_B)
    expected = reference_out(ref_jac.lora_jacobian, x, g, A, B, 0.75, mask=mask, out=out,
                             col_A=col_A, col_B=col_B)  # fmt: skip
    # sentinels everywhere but the two blocks
    assert_close_to_max(out, expected, rtol, "lora_jacobian")
    assert (out[:, :, :col_A] == SENTINEL).all() and (
        out[:, :, col_B - 2 : col_B] == SENTINEL
    ).all()
    assert (out[:, :, -3:] == SENTINEL).all()
    if mask_kind == "with_empty":
        assert (out[-1, :, col_A : col_B - 2] == 0).all()


@pytest.mark.parametrize("which", ["A", "B"])
def test_lora_jacobian_one_matrix_sign_and_bf16_out(tk, which):
    n, C, T, d_in, d_out, r = 3, 2, 9, 21, 35, 5
    x, g, mask = jac_inputs(n, C, T, d_in, d_out, torch.float32, "padded")
    A, B = torch.randn(r, d_in, device=DEVICE), torch.randn(d_out, r, device=DEVICE)
    B = B[:, :].t().contiguous().t()  # a strided (column-major) B
    col_A, col_B = (0, None) if which == "A" else (None, 1)
    P = 1 + r * max(d_in, d_out) + 1
    cols = {"col_A": col_A, "col_B": col_B}
    values = reference_out(ref_jac.lora_jacobian, x, g, A, B, 2.0, mask=mask,
                           out=torch.full((n, C, P), SENTINEL), **cols)  # fmt: skip
    start = 0 if which == "A" else 1
    width = r * (d_in if which == "A" else d_out)
    block = (slice(None), slice(None), slice(start, start + width))

    out = torch.full((n, C, P), SENTINEL, device=DEVICE)
    tk.lora_jacobian(x, g, A, B, 2.0, mask, out, col_A, col_B, sign=True)
    assert_signs(out[block], values[block], 1e-4, "sign")
    rest = torch.ones(P, dtype=torch.bool)
    rest[start : start + width] = False
    assert (out[:, :, rest] == SENTINEL).all()

    out16 = torch.zeros((n, C, P), dtype=torch.bfloat16, device=DEVICE)
    tk.lora_jacobian(x, g, A, B, 2.0, mask, out16, col_A, col_B)
    assert_close_to_max(out16[block], values[block], 1e-2, "bf16 out")


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "padded"])
def test_linear_jacobian(tk, mask_kind, transposed, dtype, rtol):
    n, C, T, d_in, d_out = 3, 2, 7, 19, 33
    x, g, mask = jac_inputs(n, C, T, d_in, d_out, dtype, mask_kind)
    col_W, col_b = 2, 2 + d_in * d_out + 1
    out = torch.full((n, C, col_b + d_out + 2), SENTINEL, device=DEVICE)
    tk.linear_jacobian(x, g, mask, out, col_W, col_b, transposed)
    expected = reference_out(ref_jac.linear_jacobian, x, g, mask=mask, out=out, col_W=col_W,
                             col_b=col_b, transposed=transposed)  # fmt: skip
    assert_close_to_max(out, expected, rtol, "linear_jacobian")
    assert (out[:, :, :col_W] == SENTINEL).all() and (out[:, :, col_b - 1] == SENTINEL).all()


@pytest.mark.parametrize("cols", [(None, 0), (0, None)])
def test_linear_jacobian_one_part_sign(tk, cols):
    n, C, T, d_in, d_out = 2, 3, 10, 9, 17
    x, g, mask = jac_inputs(n, C, T, d_in, d_out, torch.float32, "padded")
    col_W, col_b = cols
    P = d_in * d_out if col_W is not None else d_out
    values = reference_out(ref_jac.linear_jacobian, x, g, mask=mask, out=torch.zeros(n, C, P),
                           col_W=col_W, col_b=col_b, transposed=True)  # fmt: skip
    out = torch.full((n, C, P), SENTINEL, device=DEVICE)
    tk.linear_jacobian(x, g, mask, out, col_W, col_b, transposed=True, sign=True)
    assert_signs(out, values, 1e-4, "linear sign")


def test_jacobian_gpu_tiles_on_small_shapes(tk):
    """The GPU tile sizes (64-256 wide) over dims smaller than one tile."""
    n, C, T, d_in, d_out, r = 2, 2, 11, 37, 23, 6
    x, g, mask = jac_inputs(n, C, T, d_in, d_out, torch.float32, "padded")
    A, B = torch.randn(r, d_in, device=DEVICE), torch.randn(d_out, r, device=DEVICE)
    for cfg in ({"BLOCK_T": 32, "BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 32},
                {"BLOCK_T": 64, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64}):  # fmt: skip
        out = torch.full((n, C, r * (d_in + d_out)), SENTINEL, device=DEVICE)
        tk.lora_jacobian(x, g, A, B, 0.5, mask, out, 0, r * d_in, config=cfg)
        expected = reference_out(ref_jac.lora_jacobian, x, g, A, B, 0.5, mask=mask, out=out,
                                 col_A=0, col_B=r * d_in)  # fmt: skip
        assert_close_to_max(out, expected, 1e-5, f"config {cfg}")


def test_jacobian_float16_and_no_tokens(tk):
    n, C, T, d_in, d_out, r = 3, 2, 9, 20, 18, 3
    x, g, mask = jac_inputs(n, C, T, d_in, d_out, torch.float16, "padded")
    A = torch.randn(r, d_in).half().to(DEVICE)
    B = torch.randn(d_out, r).half().to(DEVICE)
    out = torch.full((n, C, r * (d_in + d_out)), SENTINEL, device=DEVICE)
    tk.lora_jacobian(x, g, A, B, 0.5, mask, out, 0, r * d_in)
    expected = reference_out(
        ref_jac.lora_jacobian, x, g, A, B, 0.5, mask=mask, out=out, col_A=0, col_B=r * d_in
    )
    assert_close_to_max(out, expected, 1e-2, "float16")
    empty = torch.full((2, 1, 5 * 4 + 4), SENTINEL, device=DEVICE)
    x0 = torch.randn(2, 0, 5, device=DEVICE)
    g0 = torch.randn(2, 1, 0, 4, device=DEVICE)
    mask0 = torch.ones(2, 0, dtype=torch.bool, device=DEVICE)
    tk.linear_jacobian(x0, g0, mask0, empty, 0, 20)
    assert (empty == 0).all()


def test_jacobian_float64_uses_twin(tk):
    n, C, T, d_in, d_out, r = 2, 2, 5, 6, 7, 2
    x, g, mask = jac_inputs(n, C, T, d_in, d_out, torch.float64, "padded")
    A, B = torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64)
    A, B = A.to(DEVICE), B.to(DEVICE)
    out = torch.zeros(n, C, r * (d_in + d_out), dtype=torch.float64, device=DEVICE)
    tk.lora_jacobian(x, g, A, B, 1.5, mask, out, 0, r * d_in)
    expected = reference_out(ref_jac.lora_jacobian, x, g, A, B, 1.5, mask=mask, out=out,
                             col_A=0, col_B=r * d_in)  # fmt: skip
    assert torch.equal(out.cpu(), expected)


def test_jacobian_input_checks(tk):
    n, C, T, d_in, d_out, r = 2, 2, 5, 6, 7, 2
    x, g, _ = jac_inputs(n, C, T, d_in, d_out, torch.float32, "none")
    A, B = torch.randn(r, d_in, device=DEVICE), torch.randn(d_out, r, device=DEVICE)
    out = torch.zeros(n, C, r * (d_in + d_out), device=DEVICE)
    with pytest.raises(ValueError, match="x must be"):
        tk.lora_jacobian(x[:, 0], g, A, B, 1.0, None, out, 0, None)
    with pytest.raises(ValueError, match="A must be"):
        tk.lora_jacobian(x, g, B, A, 1.0, None, out, 0, None)
    with pytest.raises(ValueError, match="outside"):
        tk.lora_jacobian(x, g, A, B, 1.0, None, out, 0, r * d_in + 1)
    with pytest.raises(ValueError, match="contiguous"):
        tk.lora_jacobian(x, g, A, B, 1.0, None, out.transpose(0, 1), 0, None)
    with pytest.raises(ValueError, match="unit stride"):
        tk.linear_jacobian(x.transpose(1, 2).contiguous().transpose(1, 2), g, None, out, None, 0)
    with pytest.raises(ValueError, match="mask"):
        tk.linear_jacobian(x, g, torch.ones(n, T, device=DEVICE), out, None, 0)
    with pytest.raises(TypeError, match="share a dtype"):
        tk.linear_jacobian(x, g.bfloat16(), None, out, None, 0)
    with pytest.raises(ValueError, match="input_precision"):
        tk.linear_jacobian(x, g, None, out, None, 0, input_precision="fp16")


# ----------------------------------------------------------------------------- Gram


def gram_reference(a, b, sign_a, sign_b):
    expected = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    ref_gram.gram_tile(a.double().cpu(), b.double().cpu(), expected, sign_a, sign_b)
    return expected


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("signs", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gram_tile_cross_strided(tk, split_k, signs, dtype, rtol):
    n, C, P = 7, 3, 301
    J = torch.randn(n, C, P).to(dtype).to(DEVICE)
    J2 = torch.randn(5, C, P).to(dtype).to(DEVICE)
    a = J[:, 1, :]  # strided rows of one output
    b = J2.view(-1, P)[2:13]  # rows of another block
    K = torch.full((12, 20), SENTINEL, device=DEVICE)
    out = K[3:10, 4:15]  # a tile inside a bigger kernel
    tk.gram_tile(a, b, out, *signs, config={"SPLIT_K": split_k})
    expected = gram_reference(a, b, *signs)
    if all(signs):
        assert torch.equal(out.double().cpu(), expected), "SignGD tiles are exact integers"
    else:
        assert_close_to_max(out, expected, rtol, "gram_tile")
    untouched = torch.ones(12, 20, dtype=torch.bool)
    untouched[3:10, 4:15] = False
    assert (K[untouched] == SENTINEL).all()


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("sign,int8", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("split_k", [1, 4])
def test_gram_symmetric(tk, split_k, sign, int8, dtype, rtol):
    m, P = 37, 203  # 3 x 3 tiles of 16 in the interpreter: diagonal and off-diagonal
    a = torch.randn(m, P).to(dtype).to(DEVICE)
    out = torch.full((m, m), SENTINEL, device=DEVICE)
    tk.gram_symmetric(a, out, sign, int8=int8, config={"SPLIT_K": split_k})
    assert torch.equal(out, out.T), "not exactly symmetric"
    expected = torch.empty(m, m, dtype=torch.float64)
    ref_gram.gram_symmetric(a.double().cpu(), expected, sign)
    if sign:
        assert torch.equal(out.double().cpu(), expected)
    else:
        assert_close_to_max(out, expected, rtol, "gram_symmetric")


@pytest.mark.parametrize("block,reduce_block", [(16, 32), (32, 16), (16, 64)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gram_split_reduce_tiles_differ_from_gemm_tiles(tk, symmetric, block, reduce_block):
    """The split-K sum has its own tiles (64 on the GPU under 128 GEMM tiles): a symmetric
    sum must still read only partials the GEMM computed."""
    m, P = 53, 250
    a = torch.randn(m, P, device=DEVICE)
    cfg = {"BLOCK_M": block, "BLOCK_N": block, "SPLIT_K": 3, "REDUCE_BLOCK": reduce_block}
    out = torch.full((m, m), SENTINEL, device=DEVICE)
    if symmetric:
        tk.gram_symmetric(a, out, config=cfg)
        assert torch.equal(out, out.T), "not exactly symmetric"
    else:
        tk.gram_tile(a, a, out, config=cfg)
    assert_close_to_max(out, gram_reference(a, a, False, False), 1e-5, "split-K reduce")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_half_accumulates_in_fp32(tk, dtype):
    """What the kernel is for: torch's half matmul rounds its output to half."""
    a = torch.randn(20, 1000).to(dtype).to(DEVICE)
    out = torch.empty(20, 20, device=DEVICE)
    tk.gram_symmetric(a, out)
    expected = gram_reference(a, a, False, False)
    assert_close_to_max(out, expected, 1e-5, "half -> fp32")


def test_gram_gpu_tiles_and_mixed_dtypes(tk):
    a = torch.randn(19, 150, device=DEVICE)
    b = torch.randn(70, 150).bfloat16().to(DEVICE)
    out = torch.empty(19, 70, device=DEVICE)
    tk.gram_tile(a, b, out, config={"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8})
    assert_close_to_max(out, gram_reference(a, b, False, False), 1e-5, "mixed")
    sym = torch.empty(70, 70, device=DEVICE)
    tk.gram_symmetric(
        b, sym, True, config={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2}
    )
    assert torch.equal(sym.double().cpu(), gram_reference(b, b, True, True))
    assert torch.equal(sym, sym.T)


@pytest.mark.parametrize("asym", [False, True])
def test_gram_presigned_int8(tk, asym):
    J = torch.randn(21, 130, device=DEVICE)
    J[3, :7] = 0  # sign 0
    signs = torch.sign(J).to(torch.int8)
    b = J.bfloat16() if asym else signs
    out = torch.empty(21, 21, device=DEVICE)
    tk.gram_tile(signs, b, out, True, not asym)
    expected = gram_reference(J, b, True, not asym)
    if asym:
        assert_close_to_max(out, expected, 1e-5, "int8 x bf16")
    else:
        assert torch.equal(out.double().cpu(), expected)
    with pytest.raises(TypeError, match="read as signs"):
        tk.gram_tile(signs, b, out, False, not asym)


def test_gram_float64_and_checks(tk):
    a = torch.randn(6, 40, dtype=torch.float64, device=DEVICE)
    out = torch.empty(6, 6, dtype=torch.float64, device=DEVICE)
    tk.gram_symmetric(a, out)
    expected = torch.empty(6, 6, dtype=torch.float64)
    ref_gram.gram_symmetric(a.cpu(), expected)
    assert torch.equal(out.cpu(), expected)
    f = torch.randn(6, 40, device=DEVICE)
    with pytest.raises(ValueError, match="unit stride"):
        tk.gram_tile(f.t().contiguous().t(), f, torch.empty(6, 6, device=DEVICE))
    with pytest.raises(ValueError, match="differ in P"):
        tk.gram_tile(f, f[:, :39], torch.empty(6, 6, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        tk.gram_tile(f, f, torch.empty(6, 5, device=DEVICE))
    with pytest.raises(ValueError, match="BLOCK_M == BLOCK_N"):
        tk.gram_symmetric(f, torch.empty(6, 6, device=DEVICE), config={"BLOCK_N": 32})


# ------------------------------------------------- the GPU's own default tiles, interpreted


@pytest.fixture
def gpu_defaults(tk, monkeypatch):
    """The launchers pick the tiles a GPU would get (128-256 wide, split-K, 64-wide
    reduce under 128 tiles) while the kernels still run here; on a GPU this is a no-op."""
    utils = sys.modules[f"{tk.__name__}.utils"]

    def as_on_gpu(config_fn):
        def config(*args, **kwargs):
            saved = utils.interpreting
            utils.interpreting = lambda: False
            try:
                return config_fn(*args, **kwargs)
            finally:
                utils.interpreting = saved

        return config

    chosen = []

    def recorded(config_fn):
        def config(*args, **kwargs):
            cfg = config_fn(*args, **kwargs)
            chosen.append(dict(cfg))
            return cfg

        return config

    for module, name in (("lora_jacobian", "jacobian_config"), ("gram", "gram_config")):
        mod = sys.modules[f"{tk.__name__}.{module}"]
        monkeypatch.setattr(mod, name, recorded(as_on_gpu(getattr(utils, name))))
    return chosen


@pytest.mark.parametrize("dtype,rtol", DTYPES)
def test_jacobian_with_gpu_default_tiles(tk, gpu_defaults, dtype, rtol):
    n, C, T, d_in, d_out, r = 2, 2, 70, 300, 270, 8  # 2+ tiles on every axis of the GPU tiles
    x, g, mask = jac_inputs(n, C, T, d_in, d_out, dtype, "padded")
    A = torch.randn(r, d_in).to(dtype).to(DEVICE)
    B = torch.randn(d_out, r).to(dtype).to(DEVICE)
    out = torch.full((n, C, r * (d_in + d_out)), SENTINEL, device=DEVICE)
    tk.lora_jacobian(x, g, A, B, 0.5, mask, out, 0, r * d_in)
    expected = reference_out(ref_jac.lora_jacobian, x, g, A, B, 0.5, mask=mask, out=out,
                             col_A=0, col_B=r * d_in)  # fmt: skip
    assert_close_to_max(out, expected, rtol, "lora_jacobian, GPU tiles")
    lin = torch.full((n, C, d_in * d_out + d_out), SENTINEL, device=DEVICE)
    tk.linear_jacobian(x, g, mask, lin, 0, d_in * d_out)
    expected = reference_out(ref_jac.linear_jacobian, x, g, mask=mask, out=lin, col_W=0,
                             col_b=d_in * d_out)  # fmt: skip
    assert_close_to_max(lin, expected, rtol, "linear_jacobian, GPU tiles")
    assert max(cfg["BLOCK_N"] for cfg in gpu_defaults) == 256  # GPU tiles were used


@pytest.mark.parametrize(
    "dtype,stored,signs",
    [
        (torch.float32, torch.float32, (False, False)),
        (torch.bfloat16, torch.bfloat16, (False, False)),
        (torch.bfloat16, torch.bfloat16, (True, False)),
        (torch.float32, torch.int8, (True, True)),
    ],
)
def test_gram_with_gpu_default_tiles(tk, gpu_defaults, dtype, stored, signs):
    m, P = 200, 6200  # two 128-row tiles, split-K 3 (4 SMs in the interpreter)
    values = torch.randn(m, P).to(dtype)
    a = (torch.sign(values).to(torch.int8) if stored == torch.int8 else values).to(DEVICE)
    out = torch.full((m, m), SENTINEL, device=DEVICE)
    if signs[0] == signs[1]:
        tk.gram_symmetric(a, out, signs[0])
        assert torch.equal(out, out.T), "not exactly symmetric"
    else:
        tk.gram_tile(a, a, out, *signs)
    expected = gram_reference(values, values, *signs)
    if all(signs):
        assert torch.equal(out.double().cpu(), expected), "SignGD tiles are exact integers"
    else:
        assert_close_to_max(out, expected, 1e-5, "gram, GPU tiles")
    cfg = gpu_defaults[-1]
    if dtype != torch.float32:  # the 128 tiles, summed over split-K by 64-wide reduce tiles
        assert cfg["BLOCK_M"] == 128 and cfg["SPLIT_K"] > 1 and cfg["REDUCE_BLOCK"] == 64


# ----------------------------------------------------------- symmetric product (eigensolver)


def symmetric_with_garbage_below(n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, S): S symmetric; A equals S on and above the diagonal tiles, NaN in tiles below."""
    S = torch.randn(n, n, dtype=torch.float64)
    S = S + S.T
    A = S.clone()
    for i0 in range(0, n, block):
        A[i0 + block :, i0 : i0 + block] = float("nan")
    return A.float(), S


@pytest.mark.parametrize("n,m", [(37, 5), (50, 20), (16, 1), (70, 33)])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_symm_matmul_reads_only_tiles_on_or_above_the_diagonal(tk, n, m, precision):
    A, S = symmetric_with_garbage_below(n, 16)  # the interpreter's tile: 16
    X = torch.randn(m, n).T  # a strided X [n, m]
    Y = tk.symm_matmul(A.to(DEVICE), X.to(DEVICE), input_precision=precision)
    expected = S @ X.double()
    assert Y.dtype == torch.float32 and not torch.isnan(Y).any()
    assert_close_to_max(Y, expected, 1e-5, f"symm_matmul {precision}")


@pytest.mark.parametrize("block,block_n", [(32, 16), (16, 64)])
def test_symm_matmul_other_tiles(tk, block, block_n):
    A, S = symmetric_with_garbage_below(75, block)
    X = torch.randn(75, 40)
    cfg = {"BLOCK": block, "BLOCK_N": block_n}
    Y = tk.symm_matmul(A.to(DEVICE), X.to(DEVICE), input_precision="ieee", config=cfg)
    assert_close_to_max(Y, S @ X.double(), 1e-5, "symm_matmul tiles")


def test_symm_matmul_bad_input(tk):
    with pytest.raises(ValueError, match="square"):
        tk.symm_matmul(torch.zeros(3, 4, device=DEVICE), torch.zeros(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match=r"X must be \[n, m\]"):
        tk.symm_matmul(torch.zeros(3, 3, device=DEVICE), torch.zeros(4, 2, device=DEVICE))
    with pytest.raises(TypeError, match="float32"):
        tk.symm_matmul(
            torch.zeros(3, 3, dtype=torch.float64, device=DEVICE),
            torch.zeros(3, 2, dtype=torch.float64, device=DEVICE),
        )
    empty = tk.symm_matmul(torch.zeros(0, 0, device=DEVICE), torch.zeros(0, 3, device=DEVICE))
    assert empty.shape == (0, 3)
