"""Every Triton kernel of the top-k and the bag compiles for Hopper (sm_90), on any machine.

The interpreter that runs the kernels on the CPU (TRITON_INTERPRET=1) executes their Python
and checks none of what the compiler checks: a loop-carried variable whose shape changes, a
type that does not unify, an argument a kernel no longer takes. Such a kernel passes every CPU
test and fails at its first launch on a GPU. So this test records each launch the kernels'
public functions make on tiny CPU inputs under the interpreter (the kernel, its arguments'
types, its constexprs and launch options) and compiles each distinct one for sm_90 with
Triton's bundled ptxas, in a child process with the interpreter off (compiling needs no GPU).
"""

import inspect
import json
import os

import pytest
import torch
import uninterpreted

# the interpreter is chosen by tests/conftest.py on a machine without a GPU; the child that
# compiles imports this module with it off
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton", reason="Triton is not installed (the optional extra `gpu`)")

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a Triton whose interpreter moved: nothing to record launches with
    pytest.skip("this Triton's interpreter is not where the test looks", allow_module_level=True)

from memslot.kernels import triton_bag, triton_topk  # noqa: E402

MODULES = (triton_topk, triton_bag)
POINTER = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8",
    torch.uint8: "*u8", torch.bool: "*i1",
}  # fmt: skip
OPTIONS = ("num_warps", "num_stages", "maxnreg")


def kernels() -> dict[str, InterpretedFunction]:
    """The modules' kernels (the functions launched on a grid), by qualified name."""
    found = {}
    for module in MODULES:
        for name, fn in vars(module).items():
            if isinstance(fn, InterpretedFunction) and name.endswith("_kernel"):
                found[f"{module.__name__}.{name}"] = fn
    return found


def describe(fn: InterpretedFunction, args: tuple, kwargs: dict) -> dict:
    """One launch as the compiler sees it: {"kernel", "signature", "constexprs", "options"}."""
    params = inspect.signature(fn.fn).parameters
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    bound = dict(zip(params, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for name, p in params.items():
        value = bound.get(name, p.default)
        assert value is not inspect.Parameter.empty, f"{fn.__name__}: no value for {name}"
        if isinstance(value, triton.language.constexpr):
            value = value.value
        if p.annotation is triton.language.constexpr or "constexpr" in str(p.annotation):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif value is None:  # an optional pointer left out: the launcher makes it a constexpr
            signature[name] = "constexpr"
            constexprs[name] = None
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot describe {name} = {value!r}")
    name = f"{fn.fn.__module__}.{fn.__name__}"
    return {"kernel": name, "signature": signature, "constexprs": constexprs, "options": options}


def compile_all(launches: list[dict]) -> list[str] | dict:
    """Compile each launch for sm_90 (run with the interpreter off): the errors, one a launch,
    or {"skip": why}."""
    import importlib

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        return {"skip": "this Triton cannot compile for a target it is not running on"}
    errors = []
    for launch in launches:
        module, name = launch["kernel"].rsplit(".", 1)
        fn = getattr(importlib.import_module(module), name)
        names = list(fn.arg_names)
        constexprs = {(names.index(k),): v for k, v in launch["constexprs"].items()}
        source = ASTSource(fn, launch["signature"], constexprs)
        try:
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
        except Exception as e:  # noqa: BLE001 - every kernel's error is reported, not the first
            errors.append(f"{name} {launch['constexprs']}: {type(e).__name__}: {e}")
    return errors


def compile_in_child(launches: list[dict], tmp_path) -> list[str]:
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches))
    return uninterpreted.call(
        "test_kernels_compile", f"compile_all(json.load(open({str(path)!r})))",
        env={"TRITON_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip


def run_the_kernels() -> None:
    """Each public function of the two modules on tiny inputs, through the paths the layer
    takes in serving, editing and training (and the recheck, which ties force)."""
    g = torch.Generator().manual_seed(0)
    n, heads, n_keys, half, topk = 6, 2, 40, 16, 8
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(n, heads, 2 * half, generator=g).to(dtype)
        k1 = torch.randn(heads, n_keys, half, generator=g).to(dtype)
        k2 = torch.randn(heads, n_keys, half, generator=g).to(dtype)
        weight = (1 + 0.1 * torch.randn(2, half, generator=g)).to(dtype)
        with torch.no_grad():  # serving: nothing kept for a backward
            triton_topk.query_topk(q, k1, k2, topk, weight, softmax=True)
        qg = q.clone().requires_grad_()  # training: the normalising pass, then the gradients
        w, _ = triton_topk.query_topk(qg, k1, k2, topk, weight, softmax=True)
        w.float().sum().backward()
        tied = k1.clone()
        tied[:, 1:] = tied[:, :1]  # every score of a row ties: the recheck ranks the rows
        triton_topk.product_key_topk_forward(
            q[..., :half], q[..., half:], tied, k2, topk, save_for_backward=True, recheck=True,
            block_c=16, cap=16, wide=16,
        )  # fmt: skip
    stage = torch.randint(-(2**40), 2**40, (2, heads, n, 64), generator=g)
    bound = torch.zeros(2, heads, n)
    scratch = torch.zeros(2, heads, n, 16, dtype=torch.int64)
    late = torch.zeros(2, heads, n, dtype=torch.int32)
    triton_topk.filter_candidates(stage, bound, scratch, late)

    rows, D, B = 50, 65, 8
    for dtype in (torch.bfloat16, torch.float32):
        values = torch.randn(rows, D, generator=g).to(dtype)
        idx = torch.randint(0, rows, (n, B), generator=g)
        weights = torch.rand(n, B, generator=g)
        gate = torch.randn(n, D, generator=g).to(dtype)
        grad = torch.randn(n, D, generator=g).to(dtype)
        triton_bag.order_bags(idx, weights, n_rows=rows)
        triton_bag.embedding_bag_forward(values, idx, weights, dtype)
        _, bag = triton_bag.embedding_bag_forward_gated(values, idx, weights, gate, dtype,
                                                        keep_bag=True)  # fmt: skip
        triton_bag.gate_grads(grad, gate, bag)
        triton_bag.embedding_bag_grad_weights(grad, values, idx)
        for dense in (False, True):
            triton_bag.embedding_bag_grad_rows(grad, values, idx, weights, dtype, dense)
            triton_bag.embedding_bag_backward_fused(grad, values, idx, weights, dtype, dense)
            triton_bag.embedding_bag_backward_walk(grad, values, idx, weights, dtype, dense)


@pytest.mark.skipif(
    not INTERPRETED, reason="records launches under the interpreter (a GPU compiles as it runs)"
)
def test_every_kernel_compiles_for_hopper_as_the_functions_launch_it(monkeypatch, tmp_path):
    launches, seen = [], set()
    run = InterpretedFunction.run
    known = kernels()
    recorded = {id(fn) for fn in known.values()}

    def record(self, *args, **kwargs):
        if id(self) in recorded:
            given = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            launch = describe(self, args, given)
            key = json.dumps(launch, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                launches.append(launch)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    run_the_kernels()
    # every kernel was launched at least once, so each is compiled
    assert {launch["kernel"] for launch in launches} == set(known)
    errors = compile_in_child(launches, tmp_path)
    assert not errors, "\n".join(errors)
