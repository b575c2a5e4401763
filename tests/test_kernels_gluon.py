"""The warp-specialised Gluon half top-k compiles for Hopper (sm_90a) on any machine.

Gluon has no CPU interpreter, so its results are tested on a Hopper GPU only
(``test_kernels_triton.test_the_warp_specialised_half_kernel_gives_the_same_bits``). Compiling
needs no GPU, only Triton's bundled ptxas: this catches what an edit or a Triton upgrade breaks
(an API that moved, a kernel that spills or outgrows shared memory) on the CPU too. Each
compile runs in a child process without TRITON_INTERPRET: under the interpreter (which the CPU
test run chooses before Triton is imported) Triton's own library functions are interpreted ones
that no compiler can call.
"""

import os
import re
import sys

import pytest
import uninterpreted

triton = pytest.importorskip("triton", reason="Triton is not installed (the optional extra `gpu`)")
try:
    from memslot.kernels import gluon_topk  # noqa: F401  (whether this Triton has it)
except (ImportError, AttributeError):  # a Triton without (this) Gluon
    pytest.skip("this Triton has no Gluon for Hopper", allow_module_level=True)

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
SHARED_MEMORY = 232_448  # bytes a program may use on an H100 / H200 (227 KiB)


def compile_report(half: int, tiles: dict) -> dict:
    """The kernel as ``half_topk_ws`` launches it with its default tiles (overridden by
    ``tiles``), compiled for sm_90a by ``bench/sass.py``: what the test checks of it, or
    {"skip": why}. Run it with the interpreter off (``compile_for_hopper``)."""
    sys.path.insert(0, BENCH)
    try:
        import sass

        launch = sass.ws_launch(half, 1024, **tiles)
        cubin, ptx, shared = sass.hopper_cubin(launch)
        usage, listing = sass.disassemble(cubin)
    except ImportError:
        return {"skip": "this Triton cannot compile Gluon for a target it is not running on"}
    except (NotImplementedError, FileNotFoundError) as e:
        return {"skip": str(e)}
    return {
        "wgmma": "wgmma.mma_async" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "usage": usage,
        "shared": shared,
        # warpgroup products and the waits on them: ptxas serializes the products (a wait after
        # each) when an instruction reads a result still being written
        "products": listing.count("HGMMA."),
        "waits": listing.count("WARPGROUP.DEPBAR"),
    }


def compile_for_hopper(half: int, **tiles) -> dict:
    """``compile_report`` in a child process with Triton's interpreter off."""
    return uninterpreted.call("test_kernels_gluon", f"compile_report({half}, {tiles!r})", 600)


@pytest.mark.parametrize(
    "half,tiles",
    [
        (256, {}),  # the defaults, at the benchmark's head dimension
        (128, dict(q_reg=False, stages=3)),  # query slices read from shared memory
        (256, dict(consumers=1, stages=2)),  # two programs a multiprocessor
        (256, dict(compact=0)),  # places by a product with the triangle
        (256, dict(sample=2)),  # pass one over half the sub-keys, the candidates filtered
        (256, dict(sample=4)),  # ... a quarter
        (256, dict(consumers=4, consumer_regs=120, loader_regs=24, q_reg=False, stages=3)),
        (256, dict(overlap=False)),  # each chunk's products waited for before the next's
        (256, dict(sample=4, overlap=False)),
    ],
)
def test_the_warp_specialised_half_kernel_compiles_for_hopper_without_spills(half, tiles):
    report = compile_for_hopper(half, **tiles)
    assert report["wgmma"]  # the products run on the tensor cores
    assert report["tma"]  # the loads are TMA copies
    usage = report["usage"]
    assert " LOCAL:0 " in usage, usage
    stack = int(re.search(r" STACK:(\d+) ", usage).group(1))
    if tiles.get("sample", 1) > 1 and tiles.get("overlap") is not False:
        # with a sampled bound, the overlap's second result spills a few words, outside the
        # chunk loops (SASS of triton 3.9); the tiles the benchmark timed
        assert stack <= 32, usage
    else:
        assert stack == 0, usage  # no register spills
    assert report["products"] >= 4 * report["waits"], report  # the products are not serialized
    shared = report["shared"]
    assert 0 < shared <= SHARED_MEMORY
    if tiles.get("consumers") == 1:  # two programs must fit in a multiprocessor
        assert 2 * shared <= 228 * 1024 - 2 * 1024
