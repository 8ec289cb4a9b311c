"""Static SASS roofline of pam's CUDA kernels, without a GPU.

Compiles every kernel of ``pam.kernels.cuda.SIGNATURES`` to PTX (numba-cuda's
``compile_ptx``, NVVM from the ``numba-cuda[cu12]`` extra), assembles it with ``ptxas -v``
for each requested architecture, disassembles the cubin with ``nvdisasm`` and measures the
kernel's hot loop:

* loops are the backward branches of the SASS (a ``BRA`` to a lower or equal address); a
  loop's body is every instruction from the branch target to the branch (NOPs excluded);
* a loop without global stores whose body has float adds is a reduction loop: each float
  add is one accumulated product (a PAM product is an integer add plus a float add), so its
  cost is body instructions / float adds, "per product";
* otherwise (elementwise kernels) a loop's cost is body instructions / global stores, "per
  element"; a loop that only loads (a scan such as the range check) counts global loads;
* the hot loop is, among the innermost reduction loops (those with no other reduction loop
  inside them), the one with the most products per iteration; a kernel without a reduction
  loop takes the innermost loop with the most stores, then the one with the most loads.

The count is static: each instruction of the loop body counted once per iteration, every
branch of an if/else included. Also reported: registers, spill bytes and shared memory
(from ``ptxas -v``), and an occupancy estimate from registers, shared memory and threads per
block (``pam.kernels.cuda.THREADS_PER_BLOCK``) with the architecture's per-SM limits.

Prints a table per architecture and writes validation/results/cuda_sass.json. When NVVM,
``ptxas`` or ``nvdisasm`` is missing it prints a line starting with ``SKIPPED:`` that names
what is missing and how to install it, and exits with status 0.

Tools are looked up as $PTXAS / $NVDISASM, then on PATH, then inside the ``nvidia`` pip
packages (``nvidia-cuda-nvcc-cu12`` ships ptxas, ``nvidia-cuda-nvdisasm`` ships nvdisasm).

Usage:
  python validation/cuda_sass.py [--arch sm_90 --arch sm_80] [--json PATH] [--kernel NAME ...]
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "validation" / "results"
DEFAULT_ARCHS = ("sm_90", "sm_80")

# Per-SM limits used by the occupancy estimate (CUDA programming guide, compute capability
# table): resident warps, resident blocks, 32-bit registers, shared memory usable by blocks,
# shared memory the system reserves per block.
ARCH_LIMITS = {
    "sm_80": dict(warps=64, blocks=32, regs=65536, smem=167936, smem_reserved=1024),
    "sm_86": dict(warps=48, blocks=16, regs=65536, smem=102400, smem_reserved=1024),
    "sm_89": dict(warps=48, blocks=24, regs=65536, smem=102400, smem_reserved=1024),
    "sm_90": dict(warps=64, blocks=32, regs=65536, smem=233472, smem_reserved=1024),
}
REG_ALLOC_UNIT = 256   # registers are allocated per warp in units of 256
SMEM_ALLOC_UNIT = 128


class ToolMissing(Exception):
    """A compiler or disassembler needed for the analysis is not installed."""


# --------------------------------------------------------------------------- tools
def find_tool(name, env_var):
    """Path of a CUDA binary: $env_var, PATH, or an nvidia pip package's bin/ directory."""
    path = os.environ.get(env_var)
    if path:
        if not os.access(path, os.X_OK):
            raise ToolMissing(f"${env_var} = {path} is not an executable")
        return path
    path = shutil.which(name)
    if path:
        return path
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                 *sys.path}:
        for cand in sorted(glob.glob(os.path.join(site, "nvidia", "*", "bin", name))):
            if os.access(cand, os.X_OK):
                return cand
    package = {"ptxas": "nvidia-cuda-nvcc-cu12", "nvdisasm": "nvidia-cuda-nvdisasm"}[name]
    raise ToolMissing(f"{name} not found (set ${env_var}, put it on PATH, or "
                      f"pip install {package})")


def load_kernels():
    """Import pam.kernels.cuda (without pam/__init__, which imports torch) and numba.cuda.

    Without a GPU, compile_ptx still asks the current device for its compute capability
    when it compiles called device functions; the answer is irrelevant because ``cc`` is
    passed explicitly, so the query is answered with (9, 0).
    """
    for name, path in [("pam", "pam"), ("pam.kernels", "pam/kernels")]:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(ROOT / path)]
            sys.modules[name] = mod
    try:
        from numba import config, cuda
    except ImportError as exc:
        raise ToolMissing(f"numba-cuda does not import ({exc}); pip install 'numba-cuda[cu12]'")
    if config.ENABLE_CUDASIM:
        raise ToolMissing("numba was imported with the CUDA simulator on "
                          "(NUMBA_ENABLE_CUDASIM=1); the simulator has no compiler")
    if not cuda.is_available():
        import numba.cuda.dispatcher as dispatcher
        dispatcher.get_current_device = lambda: types.SimpleNamespace(
            compute_capability=(9, 0))
    from numba import types as nt
    try:
        cuda.compile_ptx(lambda x: None, (nt.int32[::1],), cc=(9, 0))
    except Exception as exc:   # NVVM missing: numba-cuda raises various error types
        raise ToolMissing(f"NVVM unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                          f"pip install 'numba-cuda[cu12]'")
    from pam.kernels import cuda as kernels
    return cuda, kernels


# --------------------------------------------------------------------------- SASS parsing
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


def parse_sass(text):
    """[(address, opcode, full text)] of every instruction, and {label: address}."""
    instrs = []
    labels = {}
    pending = []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        body = m.group(2).strip()
        for label in pending:
            labels[label] = addr
        pending = []
        op = body
        if op.startswith("@"):
            op = op.split(None, 1)[1] if " " in op else op
        opcode = op.split()[0] if op else ""
        instrs.append((addr, opcode, body))
    return instrs, labels


def _base(opcode):
    return opcode.split(".")[0]


def loops(instrs, labels):
    """Every backward branch as a loop: dict(start, end, body instructions)."""
    found = []
    for addr, opcode, body in instrs:
        if _base(opcode) != "BRA":
            continue
        m = _BRANCH.search(body)
        if not m or m.group(1) not in labels:
            continue
        target = labels[m.group(1)]
        if target > addr:
            continue
        inside = [(a, o, b) for a, o, b in instrs if target <= a <= addr and _base(o) != "NOP"]
        found.append({"start": target, "end": addr, "body": inside})
    return found


def loop_work(loop):
    """(products, stored elements, loaded elements) of one loop iteration: float adds,
    global stores, global loads."""
    ops = [_base(o) for _, o, _ in loop["body"]]
    return (ops.count("FADD"), sum(op in ("STG", "ST", "RED", "ATOM", "ATOMG") for op in ops),
            sum(op in ("LDG", "LD") for op in ops))


def hot_loop(instrs, labels):
    """The hot loop (see the module docstring) as (loop, unit, work), or (None, None, 0)."""
    reduction, elementwise, scans = [], [], []
    for loop in loops(instrs, labels):
        products, stores, loads = loop_work(loop)
        if stores == 0 and products > 0:
            reduction.append((loop, "product", products))
        elif stores > 0:
            elementwise.append((loop, "element", stores))
        elif loads > 0:
            scans.append((loop, "element", loads))
    for group in (reduction, elementwise, scans):
        # Innermost: no other loop of the same kind lies inside it.
        inner = [c for c in group
                 if not any(o is not c and c[0]["start"] <= o[0]["start"]
                            and o[0]["end"] <= c[0]["end"] for o in group)]
        if inner:
            return max(inner, key=lambda c: (c[2], -len(c[0]["body"])))
    return None, None, 0


def instruction_mix(body, top=8):
    """{opcode base: count} of the most frequent opcodes of a loop body."""
    counts = collections.Counter(_base(o) for _, o, _ in body)
    return dict(counts.most_common(top))


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def parse_ptxas(text):
    """registers, spill store/load bytes, stack frame and static shared memory from ptxas -v."""
    def grab(regex, default=0, group=1):
        m = regex.search(text)
        return int(m.group(group)) if m else default
    return {"registers": grab(_PTXAS_REGS), "spill_store_bytes": grab(_PTXAS_SPILL),
            "spill_load_bytes": grab(_PTXAS_SPILL, group=2), "stack_bytes": grab(_PTXAS_STACK),
            "smem_bytes": grab(_PTXAS_SMEM)}


def occupancy(arch, threads, registers, smem_bytes):
    """(resident blocks per SM, fraction of the SM's warp slots) for one kernel."""
    lim = ARCH_LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (lim["regs"] // regs_per_warp) // warps
    by_warps = lim["warps"] // warps
    blocks = min(lim["blocks"], by_regs, by_warps)
    if smem_bytes:
        per_block = math.ceil(smem_bytes / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
        blocks = min(blocks, lim["smem"] // (per_block + lim["smem_reserved"]))
    return blocks, blocks * warps / lim["warps"]


# --------------------------------------------------------------------------- analysis
def analyse(cuda, kernels, name, arch, ptxas, nvdisasm, workdir):
    """Compile kernel ``name`` for ``arch`` and measure it; returns a result dict."""
    cc = (int(arch[3:-1]), int(arch[-1]))
    ptx, _ = cuda.compile_ptx(kernels.KERNEL_FUNCTIONS[name], kernels.SIGNATURES[name], cc=cc)
    stem = pathlib.Path(workdir) / f"{name}_{arch}"
    stem.with_suffix(".ptx").write_text(ptx)
    proc = subprocess.run([ptxas, f"-arch={arch}", "-O3", "-v", "-o", str(stem) + ".cubin",
                           str(stem) + ".ptx"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {name} ({arch}): {proc.stderr[-2000:]}")
    info = parse_ptxas(proc.stdout + proc.stderr)
    dis = subprocess.run([nvdisasm, "-c", str(stem) + ".cubin"], capture_output=True,
                         text=True)
    if dis.returncode != 0:
        raise RuntimeError(f"nvdisasm failed for {name} ({arch}): {dis.stderr[-2000:]}")
    instrs, labels = parse_sass(dis.stdout)
    loop, unit, work = hot_loop(instrs, labels)
    threads = kernels.THREADS_PER_BLOCK.get(name, kernels.ELEMENTWISE_THREADS)
    blocks, occ = occupancy(arch, threads, info["registers"], info["smem_bytes"])
    result = {"kernel": name, "arch": arch, "instructions": len(instrs), **info,
              "threads_per_block": threads, "blocks_per_sm": blocks, "occupancy": occ}
    if loop is None:
        result.update(unit=None, loop_instructions=None, work_per_iteration=0,
                      instructions_per_unit=None, loop_mix={})
    else:
        result.update(unit=unit, loop_instructions=len(loop["body"]), work_per_iteration=work,
                      instructions_per_unit=len(loop["body"]) / work,
                      loop_mix=instruction_mix(loop["body"]))
    return result


def print_table(rows):
    head = (f"{'kernel':40s} {'arch':6s} {'instr/unit':>10s} {'unit':8s} {'loop':>6s} "
            f"{'work':>5s} {'regs':>5s} {'spill':>6s} {'smem':>6s} {'thr':>4s} {'occ':>5s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ipu = "-" if r["instructions_per_unit"] is None else f"{r['instructions_per_unit']:.2f}"
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        print(f"{r['kernel']:40s} {r['arch']:6s} {ipu:>10s} {str(r['unit'] or '-'):8s} "
              f"{str(r['loop_instructions'] or '-'):>6s} {r['work_per_iteration']:5d} "
              f"{r['registers']:5d} {spill:6d} {r['smem_bytes']:6d} "
              f"{r['threads_per_block']:4d} {r['occupancy']:5.0%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", choices=sorted(ARCH_LIMITS),
                        help="target architecture (repeatable; default: sm_90 and sm_80)")
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS / "cuda_sass.json",
                        help="where to write the results (default: %(default)s)")
    parser.add_argument("--kernel", action="append", help="only these kernels (repeatable)")
    args = parser.parse_args(argv)
    archs = args.arch or list(DEFAULT_ARCHS)
    # The CUDA simulator has no compiler: compile for real hardware (numba reads this
    # variable when it is first imported, below).
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    try:
        ptxas = find_tool("ptxas", "PTXAS")
        nvdisasm = find_tool("nvdisasm", "NVDISASM")
        cuda, kernels = load_kernels()
    except ToolMissing as exc:
        print(f"SKIPPED: {exc}")
        return 0
    names = args.kernel or list(kernels.SIGNATURES)
    unknown = sorted(set(names) - set(kernels.SIGNATURES))
    if unknown:
        parser.error(f"unknown kernels {unknown}; known: {sorted(kernels.SIGNATURES)}")
    missing = sorted(set(kernels.KERNEL_FUNCTIONS) - set(kernels.SIGNATURES))
    if missing:
        sys.exit(f"kernels without an entry in SIGNATURES: {missing}")
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for arch in archs:
            for name in names:
                rows.append(analyse(cuda, kernels, name, arch, ptxas, nvdisasm, workdir))
                print(f"  {name} {arch}: {rows[-1]['instructions_per_unit']}", flush=True,
                      file=sys.stderr)
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "ptxas": version.strip().splitlines()[-1] if version.strip() else None,
        "archs": archs, "kernels": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
