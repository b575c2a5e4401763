"""bench/sass.py: the kernels' SASS as ptxas leaves it for Hopper, read without a GPU."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

pytest.importorskip("triton", reason="Triton is not installed (the optional extra `gpu`)")
import sass  # noqa: E402


def listing(body: list[tuple[str, int]]) -> str:
    """cuobjdump -sass lines for (instruction, stall) pairs: each instruction's two 64-bit
    words, the stall count in bits 41-44 of the second (other control bits set around it)."""
    lines = ["        code for sm_90", "                Function : _some_kernel"]
    for k, (text, stall) in enumerate(body):
        second = (0x3F << 52) | (1 << 45) | (stall << 41) | 0x1FF
        lines.append(f"        /*{16 * k:04x}*/                   {text} ;"
                     f"                 /* 0x{0xABCDEF0123 + k:016x} */")  # fmt: skip
        lines.append(f"                                                 /* 0x{second:016x} */")
    return "\n".join(lines)


def test_instructions_carry_their_stall_counts_and_opcodes():
    text = listing([("IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28]", 1), ("@!P0 BRA 0x0", 15),
                    ("HGMMA.64x64x16.F32.BF16 R24, R104, gdesc[UR16], RZ, !UPT", 2)])  # fmt: skip
    got = sass.instructions(text)
    assert [(i.address, i.opcode, i.stall) for i in got] == [
        (0x0, "IMAD", 1),
        (0x10, "BRA", 15),
        (0x20, "HGMMA", 2),
    ]


def test_loops_are_conditional_branches_back_shortest_first():
    body = [
        ("S2R R0, SR_TID.X", 1),  # 0x00
        ("FSETP.GE.AND P1, PT, R2, R3, PT", 2),  # 0x10: the outer loop starts
        ("FMNMX R4, R4, R2, !PT", 2),  # 0x20: the inner loop starts
        ("IADD3 R5, R5, 0x1, RZ", 1),  # 0x30
        ("@P1 BRA 0x20", 5),  # 0x40: the inner loop's latch
        ("@!P2 BRA 0x10", 5),  # 0x50: the outer loop's latch
        ("BRA 0x0", 5),  # 0x60: unconditional, back to the start: not a loop
        ("@PT BRA 0x0", 5),  # 0x70: always taken: not a loop either
        ("@P0 BRA 0x90", 5),  # 0x80: forward
        ("EXIT", 1),  # 0x90
    ]
    found = sass.loops(sass.instructions(listing(body)))
    assert [(lp.first, lp.last, len(lp.body), lp.cycles) for lp in found] == [
        (0x20, 0x40, 3, 8),
        (0x10, 0x50, 5, 15),
    ]
    assert sass.opcodes(found[1].body) == "BRA 2, FSETP 1, FMNMX 1, IADD3 1"


def test_resources_read_cuobjdump_usage():
    usage = (
        " Function _combine_kernel:\n"
        "  REG:80 STACK:0 SHARED:2048 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    got = sass.resources(usage)
    assert got["REG"] == 80 and got["STACK"] == 0 and got["SHARED"] == 2048
    assert got["CONSTANT[0]"] == 616


def test_a_launch_naming_an_argument_the_kernel_lacks_is_refused():
    launch = sass.combine_launch(16384, 32)
    launch.constants["NO_SUCH"] = 1
    with pytest.raises(ValueError, match="NO_SUCH"):
        sass.hopper_cubin(launch)


def test_a_launch_leaving_out_an_argument_the_kernel_takes_is_refused():
    launch = sass.combine_launch(16384, 32)
    del launch.constants["SOFTMAX"]
    with pytest.raises(ValueError, match=r"not given \['SOFTMAX'\]"):
        sass.hopper_cubin(launch)


def test_the_tool_reads_the_top_k_kernels_as_the_layer_launches_them():
    """End to end, in a child without the interpreter: the combine and the Gluon half kernel
    compile for sm_90 at the layer's tiles without spilling, and the half kernel's two passes
    show as loops of warpgroup products: pass one keeps group maxima, pass two stores."""
    try:
        from memslot.kernels import gluon_topk  # noqa: F401  (whether this Triton has Gluon)
    except (ImportError, AttributeError):
        pytest.skip("this Triton has no Gluon for Hopper")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(BENCH)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, "sass.py"), "--kernel", "combine", "--kernel", "ws"],
        capture_output=True, text=True, env=env, timeout=900, check=True,
    ).stdout  # fmt: skip
    assert "_combine_kernel" in out and "_half_topk_ws_kernel" in out, out
    heads = [line for line in out.splitlines() if line.startswith("registers ")]
    assert len(heads) == 2, out
    for head in heads:
        assert "stack 0 B" in head, out
        registers = int(head.split()[1].rstrip(","))
        assert 0 < registers <= 255, head
    loops = [line for line in out.splitlines() if line.strip().startswith("loop ")]
    products = [line for line in loops if "HGMMA 16" in line]  # 256 = 16 products of k 16
    assert any("FMNMX" in line and "STG" not in line for line in products), out  # pass one
    assert any("STG" in line for line in products), out  # pass two
