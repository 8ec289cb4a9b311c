"""validation/cuda_sass.py: the SASS parsing and hot-loop rules, and the tool end to end.

The parsing tests run everywhere. test_cuda_sass_tool compiles every kernel of
pam.kernels.cuda.SIGNATURES for sm_90 in a subprocess (without the CUDA simulator); it
needs NVVM (numba-cuda[cu12]), ptxas (nvidia-cuda-nvcc-cu12) and nvdisasm
(nvidia-cuda-nvdisasm) and is skipped where the tool reports one of them missing. Point
PAM_PTX_PYTHON at an interpreter that has them to run it here.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_sass", ROOT / "validation" / "cuda_sass.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)

# nvdisasm -c layout: an inner reduction loop (2 products in 6 instructions) inside an
# outer loop that stores, then the usual self-branch after EXIT.
SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   MOV R5, RZ ;
.L_x_1:
        /*0020*/                   LDS R2, [R1] ;
        /*0030*/                   IADD3 R3, R2, R4, RZ ;
        /*0040*/                   FADD R5, R5, R3 ;
        /*0050*/                   IMAD.IADD R3, R2, 0x1, R6 ;
        /*0060*/                   FADD R5, R5, R3 ;
        /*0070*/               @P0 BRA `(.L_x_1) ;
        /*0080*/                   NOP ;
        /*0090*/                   STG.E desc[UR4][R8.64], R5 ;
        /*00a0*/               @P1 BRA `(.L_x_0) ;
        /*00b0*/                   EXIT ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2);
"""

ELEMENTWISE = """
.L_x_5:
        /*0000*/                   LDG.E R2, desc[UR4][R8.64] ;
        /*0010*/                   IADD3 R3, R2, 0x1, RZ ;
        /*0020*/                   STG.E desc[UR4][R8.64], R3 ;
        /*0030*/               @P0 BRA `(.L_x_5) ;
        /*0040*/                   EXIT ;
"""


def test_parse_sass_reads_instructions_and_labels():
    instrs, labels = S.parse_sass(SASS)
    assert len(instrs) == 13
    assert labels == {".L_x_0": 0x10, ".L_x_1": 0x20, ".L_x_2": 0xC0}
    assert instrs[6] == (0x60, "FADD", "FADD R5, R5, R3")
    assert instrs[7][1] == "BRA"          # the predicate is not the opcode


def test_hot_loop_is_the_innermost_reduction_loop():
    instrs, labels = S.parse_sass(SASS)
    found = S.loops(instrs, labels)
    assert sorted((lp["start"], lp["end"], len(lp["body"])) for lp in found) == [
        (0x10, 0xA0, 9), (0x20, 0x70, 6), (0xC0, 0xC0, 1)]       # the NOP is not counted
    loop, unit, work = S.hot_loop(instrs, labels)
    assert (loop["start"], unit, work, len(loop["body"])) == (0x20, "product", 2, 6)
    assert S.instruction_mix(loop["body"]) == {"FADD": 2, "LDS": 1, "IADD3": 1, "IMAD": 1,
                                               "BRA": 1}


def test_hot_loop_of_an_elementwise_kernel_counts_stores():
    loop, unit, work = S.hot_loop(*S.parse_sass(ELEMENTWISE))
    assert (unit, work, len(loop["body"])) == ("element", 1, 4)
    assert S.hot_loop(*S.parse_sass("        /*0000*/     EXIT ;")) == (None, None, 0)
    scan = ELEMENTWISE.replace("STG.E desc[UR4][R8.64], R3", "IMNMX R4, R4, R3, !PT")
    loop, unit, work = S.hot_loop(*S.parse_sass(scan))       # loads only: per loaded element
    assert (unit, work, len(loop["body"])) == ("element", 1, 4)


def test_parse_ptxas_and_occupancy():
    text = ("ptxas info    : Function properties for k\n"
            "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 156 registers, used 1 barriers, 8320 bytes smem\n")
    assert S.parse_ptxas(text) == {"registers": 156, "spill_store_bytes": 4,
                                   "spill_load_bytes": 12, "stack_bytes": 8,
                                   "smem_bytes": 8320}
    assert S.occupancy("sm_90", 256, 32, 0) == (8, 1.0)           # warp slots bound
    assert S.occupancy("sm_90", 256, 255, 0) == (1, 0.125)        # registers bound
    assert S.occupancy("sm_90", 256, 156, 8320) == (1, 0.125)     # 160 regs: 1.6 blocks
    assert S.occupancy("sm_80", 64, 32, 80000) == (2, 4 / 64)     # shared memory bound


def test_cuda_sass_tool(tmp_path):
    """Every kernel compiles for sm_90 without spills; the fast matmul paths meet their
    instruction budgets per product (forward <= 3, with zeros <= 5, exact backward <= 5,
    also with zeros in grad; L-Mul forward <= 9, with zeros <= 10.5)."""
    python = os.environ.get("PAM_PTX_PYTHON", sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = tmp_path / "sass.json"
    proc = subprocess.run([python, str(ROOT / "validation" / "cuda_sass.py"), "--arch", "sm_90",
                           "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if proc.stdout.startswith("SKIPPED:"):
        pytest.skip(proc.stdout.strip()[:300])
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["kernels"]}
    sys.path.insert(0, str(ROOT))
    from pam.kernels import cuda as K
    assert sorted(rows) == sorted(K.SIGNATURES)
    for name, r in rows.items():
        assert r["spill_store_bytes"] == r["spill_load_bytes"] == 0, name
        assert r["registers"] <= 255 and r["occupancy"] > 0, name
    per_product = {name: r["instructions_per_unit"] for name, r in rows.items()
                   if r["unit"] == "product"}
    assert per_product["matmul_fast"] <= 3.0, per_product
    assert per_product["matmul_fast_zeros"] <= 5.0, per_product
    assert per_product["matmul_exact_grad_left_fast"] <= 5.0, per_product
    assert per_product["matmul_exact_grad_right_fast"] <= 5.0, per_product
    assert per_product["matmul_exact_grad_left_fast_grad_zeros"] <= 5.0, per_product
    assert per_product["matmul_exact_grad_right_fast_grad_zeros"] <= 5.0, per_product
    # L-Mul's fast path: PAM's add plus the carry correction (7.7 per product when added).
    assert per_product["matmul_lmul_fast"] <= 9.0, per_product
    assert per_product["matmul_lmul_fast_zeros"] <= 10.5, per_product
    # The general kernels call the full scalar definitions: the fast paths are far cheaper.
    assert per_product["matmul"] > 4 * per_product["matmul_fast"], per_product
    assert "matmul_fast" in proc.stdout and "instr/unit" in proc.stdout
