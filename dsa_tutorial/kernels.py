"""The one loader for every CUDA kernel of the book.

`cuda/<name>.cu` is plain CUDA C++ with `extern "C"` kernels. This module

* compiles it with NVRTC (through CuPy's bindings) for one GPU architecture, with the compile
  options defined once, in :func:`compile_options`;
* caches the result per process (:func:`load` is memoised) and on disk (a cubin keyed by the
  source, the headers it may include, the options, the architecture and the NVRTC version);
* launches kernels on torch CUDA tensors without copying them, on torch's current stream
  (:func:`launch`);
* and compiles every source on a machine without a GPU (:func:`compile_source` with
  ``arch=DEFAULT_ARCH``, "sm_90a"), which is how CI checks the CUDA sources it cannot run.

The architecture is the device's own, "sm_XY" for compute capability X.Y, except on 9.0 (H100,
H200): there it is "sm_90a", sm_90 plus the Hopper-only instructions (`wgmma`), whose cubins run on
capability 9.0 and nothing else. Every kernel of the project compiles for it; the `wgmma` kernels
(:func:`wgmma_available`) compile to a `__trap()` for every other target.

Nothing here runs at import time: CuPy is imported on first use.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "GPUUnavailableError",
    "KernelCompileError",
    "CompiledSource",
    "cuda_dir",
    "source_path",
    "kernel_names",
    "compile_options",
    "compile_source",
    "compile_ptx",
    "gpu_available",
    "require_gpu",
    "DEFAULT_ARCH",
    "arch_for_capability",
    "wgmma_available",
    "load",
    "launch",
    "Launch",
    "recording_launches",
    "defines",
    "Kernel",
    "KernelTable",
    "TENSOR_MAP_BYTES",
    "tensor_map_2d_args",
    "tensor_map_2d",
]

#: The architecture CI compiles for when there is no GPU to ask: the H200 of the book's runs, as
#: :func:`arch_for_capability` targets it ("sm_90a", so the `wgmma` kernels are compiled too).
DEFAULT_ARCH = "sm_90a"

_INSTALL_HINT = (
    "This needs an NVIDIA GPU, its driver and CuPy: `pip install -e '.[gpu]'` installs "
    "cupy-cuda13x for a CUDA 13 driver (use cupy-cuda12x for CUDA 12). Reading the book on a CPU? "
    "Skip the cells tagged `gpu`: the stored outputs show what they print on an H200, and nbval "
    "skips them where no GPU is found."
)


class GPUUnavailableError(RuntimeError):
    """Raised by every GPU entry point when no usable GPU (or no CuPy) is found."""


class KernelCompileError(RuntimeError):
    """NVRTC rejected a `.cu` file; the message carries its log with `cuda/<name>.cu(line)`."""


def cuda_dir() -> Path:
    """The folder of the `.cu` sources: `cuda/` beside the package, or `$DSA_CUDA_DIR`."""
    override = os.environ.get("DSA_CUDA_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "cuda"


def kernel_names() -> list[str]:
    """The names `load` accepts: every `cuda/*.cu`, without its suffix."""
    return sorted(p.stem for p in cuda_dir().glob("*.cu"))


def source_path(name: str) -> Path:
    """Path of `cuda/<name>.cu`; a clear `FileNotFoundError` when it does not exist."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"kernel source name must be letters, digits and '_' (no suffix), got {name!r}")
    path = cuda_dir() / f"{name}.cu"
    if not path.is_file():
        raise FileNotFoundError(
            f"no CUDA source {path}: the sources in {cuda_dir()} are {', '.join(kernel_names()) or 'none'}"
        )
    return path


def _cuda_include_dir() -> str:
    """The CUDA headers (cuda_fp8.h, cuda_bf16.h, ...) that NVRTC needs."""
    try:  # pip wheels (nvidia-cuda-runtime) or a toolkit, found the way CuPy itself finds them
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            return str(found)
    except Exception:  # noqa: BLE001 - fall back to the usual toolkit locations
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp8.h").is_file():
            return str(Path(root) / "include")
    raise GPUUnavailableError(
        "CUDA headers (cuda_fp8.h) not found: `pip install -e '.[nvrtc]'` brings them as wheels, "
        "or set CUDA_PATH to a CUDA toolkit."
    )


def compile_options(arch: str) -> tuple[str, ...]:
    """Every NVRTC option of the project, in one place.

    ``-lineinfo`` keeps source lines for compute-sanitizer and profilers at no run-time cost;
    ``--ptxas-options=-v`` makes the log report registers, shared memory and spills per kernel.
    No fast-math: the kernels are compared against float64 references.
    """
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    return (
        f"--gpu-architecture={arch}",
        "--std=c++17",
        "-lineinfo",
        "--ptxas-options=-v",
        f"-I{cuda_dir()}",
        f"-I{_cuda_include_dir()}",
    )


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as exc:  # noqa: BLE001 - ImportError or a missing libnvrtc
        raise GPUUnavailableError(
            f"NVRTC is not available ({exc}). `pip install -e '.[nvrtc]'` brings it as wheels."
        ) from exc
    return nvrtc


@dataclass(frozen=True)
class CompiledSource:
    """The cubin of one `.cu` file, and what ptxas said about each kernel in it."""

    name: str
    arch: str
    cubin: bytes
    log: str

    def entry_points(self) -> list[str]:
        """The kernels the cubin defines, read from its ELF section names (each kernel's code is
        section `.text.<name>`): reliable where the NVRTC log is not (see resource_usage)."""
        return sorted({m.decode() for m in re.findall(rb"\.text\.([A-Za-z_]\w*)\x00", self.cubin)})

    def resource_usage(self) -> dict[str, dict[str, int]]:
        """Per kernel: registers, spill stores/loads (bytes), stack frame and static shared memory,
        as ptxas reports them in the NVRTC log. On the H200 machines NVRTC caches what it compiled,
        across processes too, and a repeat compile of the same program returns the cubin with an
        empty log (seen 2026-11-28: first compile 1250 characters of log, the next ones 0): then this
        is {}. entry_points() reads the cubin instead."""
        usage: dict[str, dict[str, int]] = {}
        current = None
        for line in self.log.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = usage.setdefault(
                    m.group(1), dict(registers=0, spill_stores=0, spill_loads=0, stack=0, smem=0)
                )
                continue
            if current is None:
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                current["registers"] = int(m[1])
            m = re.search(r"(\d+) bytes smem", line)
            if m:
                current["smem"] = int(m[1])
        return usage


def _headers_digest() -> str:
    digest = hashlib.sha256()
    for header in sorted(cuda_dir().glob("*.cuh")):
        digest.update(header.name.encode() + header.read_bytes())
    return digest.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("DSA_CACHE_DIR", Path.home() / ".cache" / "dsa_tutorial" / "kernels"))


def _nvrtc_compile(name: str, source: str, arch: str, options, output: str):
    """One NVRTC program of `cuda/<name>.cu`: (its `output`, "getCUBIN" or "getPTX", and the log);
    KernelCompileError with NVRTC's log when it does not compile."""
    nvrtc = _nvrtc()
    program_name = f"cuda/{name}.cu"
    program = nvrtc.createProgram(source, program_name, [], [])
    try:
        try:
            nvrtc.compileProgram(program, list(options))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(program)
            raise KernelCompileError(f"NVRTC could not compile {program_name} for {arch}:\n{log}") from exc
        return getattr(nvrtc, output)(program), nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)


def compile_source(name: str, arch: str = DEFAULT_ARCH, *, use_cache: bool = True) -> CompiledSource:
    """Compile `cuda/<name>.cu` to a cubin for `arch` with NVRTC. Needs no GPU.

    Errors come back as :class:`KernelCompileError` whose message is NVRTC's log, with locations
    written `cuda/<name>.cu(<line>)`.
    """
    path = source_path(name)
    source = path.read_text()
    options = compile_options(arch)
    nvrtc = _nvrtc()
    version = ".".join(map(str, nvrtc.getVersion()))
    key = hashlib.sha256(
        "\0".join([source, _headers_digest(), *options[:-2], arch, version]).encode()
    ).hexdigest()[:32]
    cubin_path = _cache_dir() / f"{name}-{arch}-{key}.cubin"
    log_path = cubin_path.with_suffix(".log")
    if use_cache and cubin_path.is_file() and log_path.is_file():
        return CompiledSource(name, arch, cubin_path.read_bytes(), log_path.read_text())

    cubin, log = _nvrtc_compile(name, source, arch, options, "getCUBIN")
    if use_cache:
        try:
            cubin_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cubin_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(cubin)
            tmp.replace(cubin_path)
            log_path.write_text(log)
        except OSError:
            pass  # a read-only home only loses the disk cache
    return CompiledSource(name, arch, cubin, log)


def compile_ptx(name: str, arch: str = DEFAULT_ARCH) -> str:
    """The PTX NVRTC makes of `cuda/<name>.cu` for the virtual architecture of `arch` (sm_90a ->
    compute_90a), with the loader's other options: the code before ptxas, for tests that check which
    instructions the compiler chose (e.g. shared-memory accesses through the shared window). Needs no
    GPU; not cached."""
    options = [o.replace(f"={arch}", f"={arch.replace('sm_', 'compute_')}") for o in compile_options(arch)
               if not o.startswith("--ptxas-options")]
    ptx, _ = _nvrtc_compile(name, source_path(name).read_text(), arch, options, "getPTX")
    return ptx.decode() if isinstance(ptx, bytes) else ptx


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    """True when torch sees a CUDA GPU and CuPy can drive it."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, or CuPy without a driver
        return False


def require_gpu() -> None:
    """Raise :class:`GPUUnavailableError` (with what to install) unless a GPU is usable."""
    if not gpu_available():
        raise GPUUnavailableError(_INSTALL_HINT)


def arch_for_capability(major: int, minor: int) -> str:
    """The NVRTC target for a GPU of compute capability major.minor: "sm_90a" for 9.0, else "sm_XY".

    sm_90a is sm_90 plus the instructions only Hopper has (`wgmma`); its cubins run on capability
    9.0 exactly, which is why it is chosen there and nowhere else."""
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def _device_arch(device: int) -> str:
    return arch_for_capability(*torch.cuda.get_device_capability(device))


def _names_a_gpu(device) -> bool:
    """`device` (None: the current one, an index, "cuda:1", a torch.device) is a CUDA GPU we can use."""
    if device is not None and not isinstance(device, int) and torch.device(device).type != "cuda":
        return False
    return gpu_available()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def wgmma_available(device=None) -> bool:
    """True when `device` (default: the current CUDA device) is a usable GPU of compute capability
    9.0 (H100, H200): the only one that runs the `wgmma` kernels, compiled for sm_90a."""
    if not _names_a_gpu(device):
        return False
    index = device if isinstance(device, int) else torch.device("cuda" if device is None else device).index
    return _capability(torch.cuda.current_device() if index is None else index) == (9, 0)


@functools.lru_cache(maxsize=None)
def _load(name: str, device: int):
    import cupy
    from cupy.cuda import function

    compiled = compile_source(name, _device_arch(device))
    with cupy.cuda.Device(device):
        module = function.Module()
        module.load(compiled.cubin)  # from memory (cuModuleLoadData): no file to write or clean up
        return module


def load(name: str):
    """The compiled `cuda/<name>.cu` as a loaded CUDA module (`get_function(kernel)`), for the
    current CUDA device."""
    require_gpu()
    source_path(name)  # a clear error for a missing file, before any compilation
    return _load(name, torch.cuda.current_device())


# ----------------------------------------------------------------------------- the .cu's own constants

_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)([ \t(])(.*?)[ \t]*(?://.*)?$", re.M)


def _eval_int(expression: str, known: dict[str, int]) -> int | None:
    """The value of a C integer constant expression over +, -, *, /, %, <<, >> and parentheses
    (C's `/` on non-negative ints is Python's `//`), or None when it is not one."""
    import ast

    text = re.sub(r"\b(\d+)[uUlL]*\b", r"\1", expression.strip())
    text = re.sub(r"\b([A-Za-z_]\w*)\b", lambda m: str(known[m[1]]) if m[1] in known else m[0], text)
    if not text:
        return None
    try:
        tree = ast.parse(text.replace("/", "//"), mode="eval")
    except SyntaxError:
        return None
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv,
               ast.Mod, ast.LShift, ast.RShift, ast.USub, ast.UAdd)
    if not all(isinstance(node, allowed) for node in ast.walk(tree)):
        return None
    if not all(isinstance(n.value, int) for n in ast.walk(tree) if isinstance(n, ast.Constant)):
        return None
    return int(eval(compile(tree, "<define>", "eval"), {"__builtins__": {}}))  # noqa: S307 - ints only


@functools.lru_cache(maxsize=None)
def defines(name: str) -> dict[str, int]:
    """Every integer `#define` of `cuda/<name>.cu` and the `.cuh` headers it includes, by name: the
    launch geometry and shared-memory sizes the Python side needs, read from the one place they are
    written (never copied by hand). Function-like macros, non-integer values and names defined
    twice with different values (in #if branches) are left out. Needs no GPU."""
    text = source_path(name).read_text()
    for header in re.findall(r'#include\s+"(\w+\.cuh)"', text):
        text = (cuda_dir() / header).read_text() + "\n" + text
    values: dict[str, int] = {}
    ambiguous: set[str] = set()
    for macro, separator, body in _DEFINE.findall(text):
        if separator == "(":
            continue  # a function-like macro
        value = _eval_int(body, values)
        if value is None:
            continue
        if macro in values and values[macro] != value:
            ambiguous.add(macro)
        values[macro] = value
    return {macro: value for macro, value in values.items() if macro not in ambiguous}


# ----------------------------------------------------------------------------- kernel tables

@dataclass(frozen=True)
class Kernel:
    """One version of an operation: what the `.cu` header and the chapters call "kernel N".

    `entry` is the entry point's name, with `{field}`s filled from the call's specialisation (for
    example "act_quant_b128_{dtype}" with dtype "f32" or "bf16"); `summary` says what it does in one
    line, `needs` what it requires beyond the operation's own rules ("" when nothing)."""

    version: int
    entry: str
    summary: str
    needs: str = ""


class KernelTable:
    """The versions of one operation, all in `cuda/<source>.cu`: the one place a dispatcher, a
    test, a benchmark or a chapter learns which kernels exist.

    `variants` lists the values each `{field}` of the entry names can take (so a test can check that
    every entry point exists in the compiled cubin); `best_first` is the order `choose` prefers
    (default: highest version first)."""

    def __init__(self, source: str, kernels: Sequence[Kernel], *, variants: dict[str, Sequence] | None = None,
                 best_first: Sequence[int] | None = None):
        self.source = source
        self.kernels = {k.version: k for k in kernels}
        if len(self.kernels) != len(kernels):
            raise ValueError(f"{source}: kernel versions must be distinct")
        self.variants = {key: tuple(values) for key, values in (variants or {}).items()}
        self.best_first = tuple(best_first) if best_first is not None else tuple(sorted(self.kernels, reverse=True))
        if sorted(self.best_first) != sorted(self.kernels):
            raise ValueError(f"{source}: best_first must order every version exactly once")

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.kernels))

    def __iter__(self):
        return iter([self.kernels[v] for v in self.versions])

    def __len__(self) -> int:
        return len(self.kernels)

    def __getitem__(self, version: int) -> Kernel:
        if isinstance(version, bool) or not isinstance(version, int) or version not in self.kernels:
            listed = ", ".join(f"{k.version} ({k.summary})" for k in self)
            raise ValueError(f"kernel must be None or a version of cuda/{self.source}.cu: {listed}; got {version!r}")
        return self.kernels[version]

    def defines(self) -> dict[str, int]:
        """The integer #defines of the table's .cu file (see :func:`defines`)."""
        return defines(self.source)

    def entry(self, version: int, **fields) -> str:
        """The entry point of `version` for one specialisation, e.g. entry(2, dtype="bf16")."""
        kernel = self[version]
        for key, value in fields.items():
            if key in self.variants and value not in self.variants[key]:
                raise ValueError(f"kernel {version} of cuda/{self.source}.cu is built for {key} in "
                                 f"{self.variants[key]}, got {value!r}")
        return kernel.entry.format(**fields)

    def entry_points(self) -> list[str]:
        """Every entry point the table names, over every combination of its variants."""
        import itertools

        names = []
        for kernel in self:
            fields = [f for f in self.variants if "{" + f + "}" in kernel.entry]
            for combo in itertools.product(*(self.variants[f] for f in fields)):
                names.append(kernel.entry.format(**dict(zip(fields, combo))))
        return names

    def choose(self, kernel: int | None, why_not: dict[int, str | None]) -> Kernel:
        """The version to run. `why_not[v]` is None when version v can run these inputs, else the
        reason it cannot (a version missing from `why_not` can). kernel=None takes the best that
        can; a version that cannot is refused with its reason, before any launch."""
        if kernel is None:
            for version in self.best_first:
                if why_not.get(version) is None:
                    return self.kernels[version]
            raise ValueError(f"no kernel of cuda/{self.source}.cu runs these inputs: "
                             + "; ".join(f"kernel {v}: {why_not[v]}" for v in self.best_first))
        chosen = self[kernel]
        if why_not.get(chosen.version) is not None:
            raise ValueError(f"kernel {chosen.version} of cuda/{self.source}.cu ({chosen.summary}) cannot run "
                             f"these inputs: {why_not[chosen.version]}")
        return chosen

    def launch(self, version: int, grid, block, args, *, shared_mem: int = 0, **fields) -> None:
        """Launch kernel `version` (its entry point for `fields`) with :func:`launch`."""
        launch(self.source, self.entry(version, **fields), grid, block, args, shared_mem=shared_mem)

    def describe(self) -> str:
        """The table as the chapters print it: each version's entry point, then what it does and
        needs, wrapped to fit a page."""
        import textwrap

        lines = []
        for k in self:
            lines.append(f"kernel {k.version}  {k.entry}")
            text = k.summary + (f"; needs {k.needs}" if k.needs else "")
            lines += textwrap.wrap(text, width=78, initial_indent="    ", subsequent_indent="    ")
        return "\n".join(lines)


# struct codes of the numpy scalars a kernel may take, by (kind, bytes)
_NUMPY_CODES = {("i", 1): "b", ("u", 1): "B", ("i", 2): "h", ("u", 2): "H", ("i", 4): "i", ("u", 4): "I",
                ("i", 8): "q", ("u", 8): "Q", ("f", 2): "e", ("f", 4): "f", ("f", 8): "d"}


def _kernel_arg(value: Any, position: int, kernel: str, device_index: int) -> tuple[str, Any]:
    """One launch argument as (struct code, value): the bytes the kernel parameter holds."""
    if isinstance(value, torch.Tensor):
        if value.get_device() != device_index:  # -1 for a CPU tensor
            where = f"argument {position} of {kernel}"
            if not value.is_cuda:
                raise ValueError(f"{where} must be a CUDA tensor, got one on {value.device}")
            raise ValueError(f"{where} is on {value.device}, the launch is on cuda:{device_index}")
        if not value.is_contiguous():
            raise ValueError(f"argument {position} of {kernel} must be contiguous (call .contiguous()), "
                             f"got strides {value.stride()}")
        return "Q", value.data_ptr()  # the kernel parameter is a plain device pointer: the address itself
    kind = type(value)
    if kind is int:
        if not -(2**31) <= value < 2**31:
            raise ValueError(f"argument {position} of {kernel} = {value} does not fit an int32; pass np.int64")
        return "i", value
    if kind is float:
        return "f", value
    if kind is bool or kind is np.bool_:
        return "i", int(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind == "V":
        return f"{value.nbytes}s", value.tobytes()  # a struct passed by value: a tensor map (tensor_map_2d)
    if isinstance(value, np.generic) and (value.dtype.kind, value.dtype.itemsize) in _NUMPY_CODES:
        return _NUMPY_CODES[value.dtype.kind, value.dtype.itemsize], value.item()
    if isinstance(value, int):  # an int subclass (an IntEnum, say)
        return _kernel_arg(int(value), position, kernel, device_index)
    if isinstance(value, float):
        return "f", float(value)
    raise TypeError(f"argument {position} of {kernel}: cannot pass {type(value).__name__} to a kernel")


@functools.lru_cache(maxsize=1024)
def _parameter_layout(codes: tuple[str, ...]):
    """The parameter block of a launch whose arguments have these struct codes: (a struct that packs
    them, each one's offset, the size). Each value sits at a multiple of its own size (of 64 bytes for
    a struct by value: a tensor map's alignment)."""
    import struct

    fmt, offsets, offset = "=", [], 0
    for code in codes:
        size = struct.calcsize("=" + code)
        align = 64 if code.endswith("s") else size
        pad = -offset % align
        fmt += f"{pad}x{code}" if pad else code
        offset += pad
        offsets.append(offset)
        offset += size
    return struct.Struct(fmt), tuple(offsets), max(offset, 1)


class _ParameterBlocks(threading.local):
    """Per thread, one reusable host buffer per parameter layout, with the array of pointers into it
    that cuLaunchKernel takes (it copies the values during the call, so the buffer is free again as
    soon as the call returns): (packer, buffer, offset of the block in it, address of the pointers, the
    pointers, kept alive here)."""

    def __init__(self):
        self.blocks: dict[tuple[str, ...], tuple] = {}

    def get(self, codes: tuple[str, ...]):
        block = self.blocks.get(codes)
        if block is None:
            import ctypes

            packer, offsets, size = _parameter_layout(codes)
            raw = ctypes.create_string_buffer(size + 64)
            start = -ctypes.addressof(raw) % 64  # the block starts 64-byte aligned
            pointers = (ctypes.c_void_p * max(len(codes), 1))(*(ctypes.addressof(raw) + start + o for o in offsets))
            block = self.blocks[codes] = (packer, raw, start, ctypes.addressof(pointers), pointers)
        return block


_parameter_blocks = _ParameterBlocks()


# ----------------------------------------------------------------------------- TMA tensor maps

#: A CUtensorMap: the opaque 128 bytes (64-byte aligned) the driver encodes and a kernel takes by value
#: (`const __grid_constant__ TensorMap` in cuda/wgmma.cuh).
TENSOR_MAP_BYTES = 128
# CUtensorMapDataType of the element types a map may name, and CUtensorMapSwizzle by swizzle span in bytes
_TENSOR_MAP_DTYPES = {torch.uint8: (0, 1), torch.float8_e4m3fn: (0, 1), torch.float32: (7, 4)}
_TENSOR_MAP_SWIZZLES = {0: 0, 32: 1, 64: 2, 128: 3}


def tensor_map_2d_args(rows: int, cols: int, element_bytes: int, box_rows: int, box_cols: int,
                       swizzle: int = 0) -> dict:
    """The arguments of cuTensorMapEncodeTiled for a contiguous 2-D tensor [rows, cols] of elements of
    `element_bytes` bytes, copied in boxes of [box_rows, box_cols] with a `swizzle`-byte swizzle (0: none;
    128: chunk c of box row r lands at chunk c ^ (r % 8), the layout of cuda/wgmma.cuh's tiles). The
    driver names the innermost dimension first: dims (cols, rows), the row stride in bytes, box (box_cols,
    box_rows). The driver's rules are checked here, so a bad request fails with a message, on the CPU."""
    for name, value in (("rows", rows), ("cols", cols), ("box_rows", box_rows), ("box_cols", box_cols)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"tensor map: {name} must be a positive int, got {value!r}")
    if rows > 2**31 or cols > 2**31:
        raise ValueError(f"tensor map: each dimension must be at most 2^31, got [{rows}, {cols}]")
    if box_rows > 256 or box_cols > 256:
        raise ValueError(f"tensor map: a box dimension is at most 256 elements, got [{box_rows}, {box_cols}]")
    row_bytes, box_row_bytes = cols * element_bytes, box_cols * element_bytes
    if row_bytes % 16 or box_row_bytes % 16:
        raise ValueError(f"tensor map: rows ({row_bytes} bytes) and box rows ({box_row_bytes} bytes) must be "
                         "multiples of 16 bytes")
    if swizzle not in _TENSOR_MAP_SWIZZLES:
        raise ValueError(f"tensor map: swizzle must be 0, 32, 64 or 128 bytes, got {swizzle!r}")
    if swizzle and box_row_bytes > swizzle:
        raise ValueError(f"tensor map: a box row ({box_row_bytes} bytes) must fit the {swizzle}-byte swizzle")
    return dict(dims=(cols, rows), strides=(row_bytes,), box=(box_cols, box_rows), element_strides=(1, 1),
                swizzle=_TENSOR_MAP_SWIZZLES[swizzle])


@functools.lru_cache(maxsize=None)
def _encode_tiled():
    """The driver's cuTensorMapEncodeTiled, through ctypes (the driver library every GPU run has; CuPy
    does not wrap it)."""
    import ctypes

    encode = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    encode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    encode.restype = ctypes.c_int
    return encode


@functools.lru_cache(maxsize=256)
def _tensor_map(address: int, data_type: int, rows: int, cols: int, element_bytes: int, box_rows: int,
                box_cols: int, swizzle: int) -> np.ndarray:
    import ctypes

    args = tensor_map_2d_args(rows, cols, element_bytes, box_rows, box_cols, swizzle)
    raw = (ctypes.c_uint8 * (TENSOR_MAP_BYTES + 64))()  # the driver writes to a 64-byte aligned address
    aligned = ctypes.addressof(raw) + (-ctypes.addressof(raw)) % 64
    result = _encode_tiled()(
        ctypes.c_void_p(aligned), data_type, 2, ctypes.c_void_p(address),
        (ctypes.c_uint64 * 2)(*args["dims"]), (ctypes.c_uint64 * 1)(*args["strides"]),
        (ctypes.c_uint32 * 2)(*args["box"]), (ctypes.c_uint32 * 2)(*args["element_strides"]),
        0, args["swizzle"], 2, 0)  # no interleave; L2 promotion 128 B; out-of-bounds elements read as zeros
    if result != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {result} for {args}")
    value = np.zeros(1, dtype=np.dtype((np.void, TENSOR_MAP_BYTES)))
    ctypes.memmove(value.ctypes.data, aligned, TENSOR_MAP_BYTES)
    value.flags.writeable = False
    return value


def tensor_map_2d(tensor: torch.Tensor, box_rows: int, box_cols: int, swizzle: int = 0) -> np.ndarray:
    """A TMA tensor map (CUtensorMap) over `tensor`, a contiguous 2-D CUDA tensor [rows, cols] of uint8,
    e4m3 or float32 whose data is 16-byte aligned: boxes of [box_rows, box_cols] elements, `swizzle` as in
    :func:`tensor_map_2d_args`; elements outside the tensor read as zeros. The result, a 128-byte numpy
    void scalar, is a :func:`launch` argument passed by value (`const __grid_constant__ TensorMap`).
    Host work only (no synchronisation, no allocation on the GPU); the same request returns the same
    (read-only) map, from a cache keyed by address, shape and box."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_contiguous() or not tensor.is_cuda:
        raise ValueError("tensor_map_2d needs a contiguous 2-D CUDA tensor")
    if tensor.dtype not in _TENSOR_MAP_DTYPES:
        raise ValueError(f"tensor_map_2d: dtype must be one of {list(_TENSOR_MAP_DTYPES)}, got {tensor.dtype}")
    if tensor.data_ptr() % 16:
        raise ValueError(f"tensor_map_2d: the data must be 16-byte aligned, got {tensor.data_ptr() % 16} bytes past")
    data_type, element_bytes = _TENSOR_MAP_DTYPES[tensor.dtype]
    return _tensor_map(tensor.data_ptr(), data_type, tensor.shape[0], tensor.shape[1], element_bytes, box_rows,
                       box_cols, swizzle)


def _current_stream_handle(device_index: int) -> int:
    """The raw handle of torch's current stream on the device (the stream a CUDA graph captures)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds: no Stream object made
    return raw(device_index) if raw is not None else torch.cuda.current_stream(device_index).cuda_stream


@functools.lru_cache(maxsize=None)
def _function(name: str, kernel: str, device: int):
    return load(name).get_function(kernel)


_dynamic_smem: dict[tuple[str, str, int], int] = {}  # the dynamic shared memory each function is allowed


def launch(
    name: str,
    kernel: str,
    grid: Sequence[int] | int,
    block: Sequence[int] | int,
    args: Sequence[Any],
    *,
    shared_mem: int = 0,
) -> None:
    """Launch `kernel` of `cuda/<name>.cu` on torch's current stream.

    Tensors are passed zero-copy (their address) and must be contiguous CUDA tensors of the current
    device; Python ints and bools become `int`, floats `float` (use numpy scalars for other widths), a
    one-element numpy void array a struct passed by value (a tensor map). `shared_mem` bytes of
    dynamic shared memory; the kernel's limit is raised to it first (static and dynamic together may
    pass 48 KiB only with the limit raised).

    The launch itself is the driver's cuLaunchKernel (CuPy's thin binding of it), with the arguments
    packed by `struct` into a reusable parameter block: CuPy's own kernel call would first wrap each
    argument in an object, which costs the host more than the launch itself.
    """
    grid = (int(grid),) if isinstance(grid, int) else tuple(int(g) for g in grid)
    block = (int(block),) if isinstance(block, int) else tuple(int(b) for b in block)
    if not 1 <= len(grid) <= 3 or any(g <= 0 for g in grid) or not 1 <= len(block) <= 3 or any(b <= 0 for b in block):
        raise ValueError(f"{kernel}: grid {grid} and block {block} must be 1 to 3 positive sizes")
    require_gpu()
    index = torch.cuda.current_device()
    function = _function(name, kernel, index)
    codes, values = [], []
    for position, value in enumerate(args):
        code, value = _kernel_arg(value, position, kernel, index)
        codes.append(code)
        values.append(value)
    codes = tuple(codes)
    from cupy.cuda import driver

    if shared_mem > _dynamic_smem.get((name, kernel, index), 0):
        # A kernel must be allowed its dynamic shared memory first whenever static + dynamic pass 48 KiB:
        # so raise the limit for every request larger than the last one (once per kernel and size).
        driver.funcSetAttribute(function.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared_mem)
        _dynamic_smem[(name, kernel, index)] = shared_mem
    gx, gy, gz = grid + (1,) * (3 - len(grid))
    bx, by, bz = block + (1,) * (3 - len(block))
    packer, raw, start, parameters, _ = _parameter_blocks.get(codes)
    packer.pack_into(raw, start, *values)
    try:
        driver.launchKernel(function.ptr, gx, gy, gz, bx, by, bz, shared_mem, _current_stream_handle(index),
                            parameters, 0)
    except driver.CUDADriverError as error:
        raise RuntimeError(f"launching {kernel} (grid {grid}, block {block}, {shared_mem} bytes of shared "
                           f"memory) failed: {error}") from error
    for record in _recorders:
        record.append(Launch(name, kernel, grid, block, tuple(args), shared_mem))


@dataclass(frozen=True)
class Launch:
    """One kernel launch as :func:`launch` made it: enough to make it again (:meth:`again`)."""

    source: str
    kernel: str
    grid: tuple
    block: tuple
    args: tuple
    shared_mem: int

    def again(self) -> None:
        launch(self.source, self.kernel, self.grid, self.block, self.args, shared_mem=self.shared_mem)


_recorders: list[list[Launch]] = []


@contextlib.contextmanager
def recording_launches():
    """``with recording_launches() as launches:`` lists every :func:`launch` made inside the block
    (after it ran). The benchmarks replay them to time the kernels alone, without the public call's
    Python around them."""
    launches: list[Launch] = []
    _recorders.append(launches)
    try:
        yield launches
    finally:
        _recorders.remove(launches)
