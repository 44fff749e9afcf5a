"""Where Triton kernels run, and the one place fastvl launches them.

Kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. Every launch goes
through :func:`launch`, which checks the grid against CUDA's limits and then runs ``kernel[grid]``.

Inside ``with compile_for(80) as reports:`` the same launch code compiles instead of running: the
public functions, called with CPU tensors, reach :func:`launch`, which binds the real arguments with
Triton's own specialisation rules (dtypes, 16-byte alignment, integer widths), compiles the kernel to
PTX and a cubin for the chosen GPU (``GPUTarget("cuda", 80, 32)``) and records the registers and
spill bytes that ``ptxas -v`` reports. Outputs are then left unwritten. No GPU or CUDA driver is
needed, only Triton's bundled ptxas; the kernels must be real (not interpreted), so this works only
in a process started without ``TRITON_INTERPRET=1``. Results are cached per process.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import os
import re
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

try:
    import triton

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# CUDA's launch limits per grid axis (x, y, z).
MAX_GRID = (2**31 - 1, 65535, 65535)

# The target the launch code compiles for inside `compile_for` (None: launch for real).
_COMPILE_TARGET: contextvars.ContextVar[Optional["_CompileSession"]] = contextvars.ContextVar(
    "fastvl_triton_compile_target", default=None)


def triton_runs_on(device: torch.device) -> bool:
    if compiling():
        return device.type == "cpu"
    return HAS_TRITON and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def compiling() -> bool:
    return _COMPILE_TARGET.get() is not None


def cuda_capability(device: torch.device) -> Optional[int]:
    """Compute capability as ``major * 10 + minor`` (80 = A100, 90 = H100) of the GPU the launch
    code targets: the `compile_for` target, the CUDA device, or None (interpreter on CPU)."""
    session = _COMPILE_TARGET.get()
    if session is not None:
        return session.capability
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    return None


def check_grid(grid: tuple, kernel_name: str) -> None:
    """Raise a clear error where CUDA would refuse the launch (axes 1 and 2 stop at 65535)."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if size > limit:
            raise ValueError(f"{kernel_name}: grid axis {axis} has {size} programs, over CUDA's limit of {limit}; "
                             f"the input is too large for one launch (split the batch)")


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or its compilation inside `compile_for`."""
    name = getattr(kernel, "__name__", repr(kernel))
    check_grid(grid, name)
    session = _COMPILE_TARGET.get()
    if session is None:
        kernel[grid](*args, **kwargs)
    else:
        session.compile(kernel, name, args, kwargs)


# --------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU target, without a GPU.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileReport:
    """What the compiler made of one launch: the kernel, its specialisation and ptxas' resource use."""

    kernel: str
    target: str  # "sm_80"
    signature: dict  # argument name -> Triton type ("*fp16", "i32", "constexpr", ...)
    constexprs: dict  # name -> value of the compile-time arguments (tiles, flags)
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int
    seconds: float  # compile time (Triton front end, LLVM, ptxas)

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CACHE: dict = {}  # (kernel, capability, specialisation) -> CompileReport, for the process


def ptxas_path() -> Optional[str]:
    """Triton's bundled ptxas (or TRITON_PTXAS_PATH), None when absent."""
    if not HAS_TRITON:
        return None
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception:  # no NVIDIA backend in this Triton build, or no ptxas binary
        return None
    return path if path and os.path.exists(path) else None


class _CompileSession:
    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)
        self.backend = make_backend(self.target)
        self.reports: list[CompileReport] = []
        self._binders: dict = {}
        self._create_binder = create_function_from_signature

    def compile(self, kernel, name: str, args: tuple, kwargs: dict) -> None:
        from triton.runtime.jit import JITFunction

        if not isinstance(kernel, JITFunction):
            raise RuntimeError(f"{name}: compile_for needs compiled (not interpreted) kernels; start the process "
                               f"without TRITON_INTERPRET=1")
        binder = self._binders.get(name)
        if binder is None:
            binder = self._binders[name] = self._create_binder(kernel.signature, kernel.params, self.backend)
        # As JITFunction.run: the same binder, specialisation and packing, for our target.
        kwargs = dict(kwargs, debug=False)
        bound, specialization, options = binder(*args, **kwargs)
        key = (name, self.capability, repr(specialization), repr(sorted(options.items())))
        report = _CACHE.get(key)
        if report is None:
            report = _CACHE[key] = self._compile(kernel, name, kwargs, bound, specialization, options)
        self.reports.append(report)

    def _compile(self, kernel, name, kwargs, bound, specialization, options) -> CompileReport:
        from triton import knobs
        from triton.compiler import ASTSource

        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound, specialization,
                                                                  options)
        log = io.StringIO()
        start = time.perf_counter()
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True  # a real compile (and a ptxas log) every time
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=self.target,
                                      options=options.__dict__)
        seconds = time.perf_counter() - start
        text = log.getvalue()
        registers, spills = _PTXAS_REGISTERS.search(text), _PTXAS_SPILLS.search(text)
        if registers is None or spills is None:
            raise RuntimeError(f"{name}: no register/spill line in the ptxas log:\n{text[-2000:]}")
        names = list(bound)
        return CompileReport(
            kernel=name, target=f"sm_{self.capability}",
            signature={k: v for k, v in signature.items() if v != "constexpr"},
            constexprs={names[path[0]]: value for path, value in constexprs.items()},
            num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
            registers=int(registers.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
            shared_bytes=compiled.metadata.shared, seconds=seconds,
        )


@contextlib.contextmanager
def compile_for(capability: int) -> Iterator[list[CompileReport]]:
    """Within the block, fastvl's Triton launches (public functions on CPU tensors, ``impl="triton"``)
    compile for compute capability ``capability`` (80, 90, ...) instead of running; yields the list
    of :class:`CompileReport`, one per launch, filled as the block runs."""
    if not HAS_TRITON:
        raise RuntimeError("compile_for needs triton installed")
    if ptxas_path() is None:
        raise RuntimeError("compile_for needs ptxas (bundled with Triton under triton/backends/nvidia/bin, "
                           "or set TRITON_PTXAS_PATH)")
    session = _CompileSession(capability)
    token = _COMPILE_TARGET.set(session)
    try:
        yield session.reports
    finally:
        _COMPILE_TARGET.reset(token)
