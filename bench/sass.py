"""The top-k's kernels as ptxas leaves them for Hopper, read on any machine (no GPU needed).

Triton compiles each kernel for sm_90 with its bundled ptxas, at the tiles the layer launches
it with, and its bundled cuobjdump disassembles it. For each kernel this prints the registers,
stack (local memory: spills or local arrays) and shared memory of a program, its instructions
and the most frequent opcodes, and each loop (a backward branch) with its instructions a pass
and the cycles ptxas planned between them (the stall counts in each instruction's control
bits: what one warp alone takes to issue them, at least). Run it where Triton is installed
with its interpreter off:

    python bench/sass.py                              # the combine and the Gluon half kernel
    python bench/sass.py --kernel ws --n-keys 4096    # one kernel, at 4,096 sub-keys
    python bench/sass.py --kernel combine --keep combine.sass   # and keep the listing
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton

from memslot.kernels import triton_topk as tk

KERNELS = ("combine", "ws")
_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s+/\* 0x([0-9a-f]{16}) \*/")
_WORD = re.compile(r"/\* 0x([0-9a-f]{16}) \*/")
_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


@dataclass
class Launch:
    """A kernel as a launch gives it to the compiler."""

    kernel: object  # a JITFunction (Triton or Gluon)
    types: dict[str, str]  # the arguments that are not constexprs: their types
    constants: dict[str, object]
    options: dict[str, int]


@dataclass
class Instruction:
    address: int
    text: str
    stall: int  # cycles before the warp's next instruction issues (its control bits)

    @property
    def opcode(self) -> str:
        words = self.text.split()
        op = words[1] if words[0].startswith("@") else words[0]  # past a predicate
        return op.split(".")[0]


def bundled(tool: str) -> str:
    """The path of one of Triton's bundled CUDA tools (ptxas, cuobjdump, nvdisasm)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"this Triton has no bundled {tool} (looked for {path})")
    return path


def hopper_cubin(launch: Launch) -> tuple[bytes, str, int]:
    """(cubin, ptx, shared bytes) of the launch compiled for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(launch.kernel.fn).parameters)
    given = set(launch.types) | set(launch.constants)
    if given != set(names):  # the kernel's arguments changed since its launch was written
        raise ValueError(f"{launch.kernel.__name__}: no such arguments {sorted(given - set(names))}"
                         f", arguments not given {sorted(set(names) - given)}")  # fmt: skip
    signature = {n: launch.types.get(n, "constexpr") for n in names}
    constants = {(names.index(k),): v for k, v in launch.constants.items()}
    source_type = ASTSource
    if type(launch.kernel).__module__.startswith("triton.experimental.gluon"):
        from triton.experimental.gluon._runtime import GluonASTSource

        source_type = GluonASTSource
    compiled = triton.compile(
        source_type(launch.kernel, signature, constants),
        target=GPUTarget("cuda", 90, 32),
        options=launch.options,
    )
    return compiled.asm["cubin"], compiled.asm["ptx"], compiled.metadata.shared


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(cuobjdump's resource usage, its SASS listing) of a cubin."""
    tool = bundled("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    finally:
        os.remove(f.name)
    return usage, sass


def resources(usage: str) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the (one) function in cuobjdump's usage report."""
    return {k: int(v) for k, v in re.findall(r"\b([A-Z]+(?:\[\d+\])?):(\d+)\b", usage)}


def instructions(sass: str) -> list[Instruction]:
    """The listing's instructions with their stall counts. Each Volta-and-later instruction is
    128 bits, printed as two 64-bit words; the stall count is bits 41-44 of the second."""
    lines = sass.splitlines()
    out = []
    for k, line in enumerate(lines):
        m = _LINE.match(line)
        if m and k + 1 < len(lines):
            second = _WORD.search(lines[k + 1])
            if second:
                stall = (int(second.group(1), 16) >> 41) & 0xF
                out.append(Instruction(int(m.group(1), 16), m.group(2).strip(), stall))
    return out


@dataclass
class Loop:
    first: int  # address of its first instruction
    last: int  # address of the branch back
    body: list[Instruction]

    @property
    def cycles(self) -> int:
        return sum(i.stall for i in self.body)


def loops(listing: list[Instruction]) -> list[Loop]:
    """The span of every conditional backward branch (branch included), shortest first: a loop
    body as ptxas laid it out (bottom-tested), every path of it included. Unconditional
    branches back are left out: they return from code placed after the kernel's end (such as
    the retries of an mbarrier wait), not the latches of loops."""
    where = {ins.address: k for k, ins in enumerate(listing)}
    found = []
    for k, ins in enumerate(listing):
        m = _TARGET.search(ins.text)
        if m and ins.text.startswith("@") and not ins.text.startswith("@PT "):
            target = int(m.group(1), 16)
            if target <= ins.address and target in where:
                found.append(Loop(target, ins.address, listing[where[target] : k + 1]))
    return sorted(found, key=lambda lp: (len(lp.body), lp.first))


def opcodes(listing: list[Instruction], top: int = 8) -> str:
    counts = collections.Counter(i.opcode for i in listing)
    return ", ".join(f"{op} {n}" for op, n in counts.most_common(top))


# ---- the layer's launches ----------------------------------------------------------------------


def combine_launch(tokens: int, topk: int, softmax: bool = True) -> Launch:
    """``triton_topk._combine_kernel`` as ``product_key_topk_forward`` launches it by default."""
    tiles = tk._default_tiles(tokens)
    kp = tk._next_pow2(topk, 16)
    pair_a, _ = tk._candidate_pairs(topk, torch.device("cpu"))
    *_, n_rest = tk._split_pairs(topk, torch.device("cpu"))
    types = {name: "*i32" for name in ("half_i_ptr", "pair_a_ptr", "pair_b_ptr", "pair_rank_ptr",
                                         "col0_id_ptr", "rest_a_ptr", "rest_b_ptr", "rest_id_ptr",
                                         "late_ptr")}  # fmt: skip
    types |= {"half_s_ptr": "*fp32", "scores_ptr": "*fp32", "slots_ptr": "*i64",
              "scratch_ptr": "*i64", "R": "i32", "n_keys": "i32", "n_pairs": "i32",
              "n_rest": "i32", "H": "i32"}  # fmt: skip
    constants = dict(K=topk, KP=kp, CP=tk._next_pow2(pair_a.numel(), 16),
                     BLOCK_R=tiles["combine_rows"], SAVE_FOR_BACKWARD=False,
                     SPLIT=tiles["split"], RP=tk._next_pow2(max(n_rest, kp), 16),
                     RANK=tiles["later"], CAP=2 * kp, WIDE=tiles["wide"],
                     SOFTMAX=softmax)  # fmt: skip
    return Launch(tk._combine_kernel, types, constants, {"num_warps": 4})


def ws_launch(half: int, n_keys: int, topk: int = 32, **tiles) -> Launch:
    """``gluon_topk._half_topk_ws_kernel`` as ``half_topk_ws`` launches it: its defaults, those
    of ``triton_topk`` for n_keys, then ``tiles``."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from memslot.kernels import gluon_topk

    if not hasattr(TensorDescriptor, "__mangle__"):
        raise NotImplementedError("this Triton's descriptors do not name their type")
    params = inspect.signature(gluon_topk.half_topk_ws).parameters
    t = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    t |= tk._default_ws_tiles(n_keys) | tiles
    overlap = t["overlap"]
    stage_k = t["stage_k"] or gluon_topk.stage_k_by_default(topk, t["sample"])
    if overlap is None:
        overlap = gluon_topk.overlap_by_default(t["compact"], t["consumers"])
    rows, split = gluon_topk.ROWS_, gluon_topk.SPLIT_
    base = torch.empty(8, split, dtype=torch.bfloat16)  # a descriptor here only names a type

    def desc(block: int) -> str:
        return TensorDescriptor(base, [8, split], [split, 1], [block, split],
                                gluon_topk._layout(block)).__mangle__()  # fmt: skip

    types = {"q_desc": desc(rows), "k1_desc": desc(t["block_c"]), "k2_desc": desc(t["block_c"]),
             "scratch_ptr": "*i64", "late_ptr": "*i32", "bound_ptr": "*fp32", "N": "i32",
             "H": "i32", "n_keys": "i32"}  # fmt: skip
    wide = tk._default_tiles(1024)["wide"] * t["sample"]  # the stage's places a row
    constants = dict(K=topk, WIDE=wide, BLOCK_C=t["block_c"], KSPLIT=half // split,
                     STAGES=t["stages"], BISECT=t["bisect"], STOP=t["stop"],
                     CONSUMER_REGS=t["consumer_regs"], LOADER_REGS=t["loader_regs"],
                     Q_REG=t["q_reg"], NUM_C=t["consumers"], COMPACT=t["compact"],
                     SAMPLE=t["sample"], OVERLAP=overlap, STAGE_K=stage_k)  # fmt: skip
    options = {"num_warps": 4}
    if t["consumers"] == 1:
        options["maxnreg"] = t["maxnreg"] or 128
    return Launch(gluon_topk._half_topk_ws_kernel, types, constants, options)


def launch_of(name: str, args) -> Launch:
    if name == "combine":
        return combine_launch(args.tokens, args.topk)
    return ws_launch(args.k_dim // 2, args.n_keys, args.topk)


def report(name: str, launch: Launch, keep: str | None = None, min_loop: int = 40) -> None:
    cubin, _, shared = hopper_cubin(launch)
    usage, sass = disassemble(cubin)
    if keep:
        with open(keep, "w") as f:
            f.write(sass)
    res = resources(usage)
    listing = instructions(sass)
    print(f"\n## {name}: {launch.kernel.__name__} {launch.options}")
    print(f"registers {res.get('REG')}, stack {res.get('STACK')} B, shared {shared} B, "
          f"local {res.get('LOCAL')} B; {len(listing)} instructions "
          f"({sum(i.stall for i in listing)} planned cycles): {opcodes(listing)}")  # fmt: skip
    for lp in loops(listing):
        if len(lp.body) >= min_loop:
            print(f"  loop {lp.first:#x}-{lp.last:#x}: {len(lp.body)} instructions, "
                  f"{lp.cycles} planned cycles: {opcodes(lp.body, 10)}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", choices=KERNELS, action="append", help="(default: all)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--k-dim", type=int, default=512)
    p.add_argument("--n-keys", type=int, default=1024)
    p.add_argument("--keep", help="write the (last) kernel's SASS listing to this file")
    p.add_argument("--min-loop", type=int, default=40, help="shortest loop body to list")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("compiling needs Triton's compiler: unset TRITON_INTERPRET")
    print(f"triton {triton.__version__}, sm_90; tokens {args.tokens}, top-{args.topk}, "
          f"k_dim {args.k_dim}, {args.n_keys} sub-keys")  # fmt: skip
    for name in args.kernel or KERNELS:
        report(name, launch_of(name, args), args.keep, args.min_loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
