"""IF nodes in captured CUDA graphs: work that runs only where a flag on the device is set, no host read.

CUDA 12.4 added conditional graph nodes (CUDA Programming Guide, "Conditional Graph Nodes"). Where
torch records them itself (``CUDAGraph.begin_capture_to_if_node``, absent from torch 2.11, present in
2.13), `if_node` uses that. Otherwise it adds one to the torch capture through the driver API (ctypes
on ``libcuda``, no build step)::

    capturing stream:  … ─ set_if(handle, flag) ─ IF(handle) ─ what follows …
                                                     │
    body stream, captured into the node's body graph: └─ the work issued inside ``with if_node(flag):``

``set_if`` is a one-thread kernel that copies the flag into the node's handle
(``cudaGraphSetConditional``, which lives in the CUDA device runtime, ``libcudadevrt.a``: the kernel is
linked against it once per process by the driver's JIT linker). The handle resets to 0 at every
launch of the graph. The body must not allocate (its stream is not torch's capture stream): it
launches kernels on buffers that exist already.

Where any piece is missing (no CUDA, a driver older than 12.4, no ``libcudadevrt.a``: set
``LEGOLM_CUDADEVRT`` to its path), `available` says False and callers read the flag on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

DEVRT_ENV = "LEGOLM_CUDADEVRT"
MIN_DRIVER = 12040  # conditional nodes (CUDA 12.4)

# driver API constants (cuda.h)
_NODE_CONDITIONAL = 13  # CU_GRAPH_NODE_TYPE_CONDITIONAL
_COND_IF = 0  # CU_GRAPH_COND_TYPE_IF
_COND_ASSIGN_DEFAULT = 1  # CU_GRAPH_COND_ASSIGN_DEFAULT: the handle resets at each graph launch
_CAPTURE_ACTIVE = 1  # CU_STREAM_CAPTURE_STATUS_ACTIVE
_CAPTURE_RELAXED = 2  # CU_STREAM_CAPTURE_MODE_RELAXED
_SET_DEPENDENCIES = 1  # CU_STREAM_SET_CAPTURE_DEPENDENCIES
_STREAM_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING
_JIT_INPUT_PTX, _JIT_INPUT_LIBRARY = 1, 4

_PTX = """
.version 7.8
.target sm_{arch}
.address_size 64
.extern .func cudaGraphSetConditional (.param .b64 handle, .param .b32 value);
.visible .entry legolm_set_if (.param .u64 handle, .param .u64 flag)
{{
    .reg .pred %p;
    .reg .b32 %r<3>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [handle];
    ld.param.u64 %rd2, [flag];
    cvta.to.global.u64 %rd3, %rd2;
    ld.global.u8 %r1, [%rd3];
    setp.ne.s32 %p, %r1, 0;
    selp.u32 %r2, 1, 0, %p;
    {{
        .param .b64 p0;
        .param .b32 p1;
        st.param.b64 [p0], %rd1;
        st.param.b32 [p1], %r2;
        call.uni cudaGraphSetConditional, (p0, p1);
    }}
    ret;
}}
"""


class _Conditional(ctypes.Structure):  # CUDA_CONDITIONAL_NODE_PARAMS
    _fields_ = [("handle", ctypes.c_uint64), ("type", ctypes.c_int), ("size", ctypes.c_uint),
                ("phGraph_out", ctypes.POINTER(ctypes.c_void_p)), ("ctx", ctypes.c_void_p)]


class _Params(ctypes.Union):
    _fields_ = [("reserved1", ctypes.c_longlong * 29), ("conditional", _Conditional)]


class _NodeParams(ctypes.Structure):  # CUgraphNodeParams
    _fields_ = [("type", ctypes.c_int), ("reserved0", ctypes.c_int * 3), ("u", _Params),
                ("reserved2", ctypes.c_longlong)]


class GraphIfError(RuntimeError):
    """A driver call of `if_node` failed (its name and CUresult in the message)."""


def _check(result: int, what: str) -> None:
    if result != 0:
        raise GraphIfError(f"{what} failed with CUresult {result}")


@functools.cache
def _libcuda() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def find_devrt() -> Path | None:
    """``libcudadevrt.a``: ``$LEGOLM_CUDADEVRT``, else the NVIDIA runtime wheels torch installs (the one of torch's
    CUDA major version first: ``nvidia/cu13/lib`` for CUDA 13, ``nvidia/cuda_runtime/lib`` for 12), else a toolkit."""
    if os.environ.get(DEVRT_ENV):
        path = Path(os.environ[DEVRT_ENV]).expanduser()
        return path if path.is_file() else None
    roots: list[Path] = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            roots.append(Path(home))
    found = [path for root in roots
             for pattern in ("*/lib/libcudadevrt.a", "lib64/libcudadevrt.a", "targets/*/lib/libcudadevrt.a")
             for path in sorted(root.glob(pattern))]
    major = (torch.version.cuda or "").split(".")[0]
    wheel = {f"cu{major}", *(["cuda_runtime"] if major == "12" else [])}  # the wheels' folder names
    ranked = [path for path in found if path.parent.parent.name in wheel] + found
    return ranked[0] if ranked else None


@dataclass(frozen=True)
class _Runtime:
    """What `if_node` needs on one device, made before any capture (module loads and stream creation are not
    allowed while torch captures): the ``set_if`` kernel and the stream that captures the IF bodies."""

    set_if: ctypes.c_void_p
    body: torch.cuda.Stream


@functools.cache
def _runtime(device: int) -> _Runtime | None:
    """The ``set_if`` kernel linked and loaded in ``device``'s context and a body stream, or None where the kernel
    cannot be built."""
    cu, devrt = _libcuda(), find_devrt()
    if cu is None or devrt is None:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    arch = min(major * 10 + minor, 90)  # PTX ISA 7.8 targets up to sm_90; the driver JITs it forward
    ptx = _PTX.format(arch=arch).encode()
    torch.cuda.synchronize(device)  # the device's primary context is current on this thread
    state = ctypes.c_void_p()
    _check(cu.cuLinkCreate_v2(0, None, None, ctypes.byref(state)), "cuLinkCreate")
    try:
        _check(cu.cuLinkAddData_v2(state, _JIT_INPUT_PTX, ptx, ctypes.c_size_t(len(ptx)), b"set_if.ptx", 0, None, None),
               "cuLinkAddData")
        _check(cu.cuLinkAddFile_v2(state, _JIT_INPUT_LIBRARY, str(devrt).encode(), 0, None, None), "cuLinkAddFile")
        cubin, size = ctypes.c_void_p(), ctypes.c_size_t()
        _check(cu.cuLinkComplete(state, ctypes.byref(cubin), ctypes.byref(size)), "cuLinkComplete")
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        _check(cu.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")  # copies the image
    finally:
        cu.cuLinkDestroy(state)
    _check(cu.cuModuleGetFunction(ctypes.byref(fn), module, b"legolm_set_if"), "cuModuleGetFunction")
    # The body stream is this module's own: `torch.cuda.Stream()` hands out its pool's 32 streams round-robin, so
    # a later capture stream (`torch.cuda.graph`'s, a caller's) would sooner or later be this one, already
    # capturing when an IF body begins (CUresult 401, CUDA_ERROR_ILLEGAL_STATE).
    stream = ctypes.c_void_p()
    _check(cu.cuStreamCreate(ctypes.byref(stream), _STREAM_NON_BLOCKING), "cuStreamCreate")
    return _Runtime(fn, torch.cuda.ExternalStream(stream.value, device=device))


def torch_records_if_nodes() -> bool:
    """This torch's `torch.cuda.CUDAGraph` records IF nodes itself."""
    return hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node") and \
        hasattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph")


def _version(text: str) -> int:
    """``"12.4"`` -> 12040 (the driver API's numbering)."""
    major, minor = (int(v) for v in [*text.split("."), "0"][:2])
    return major * 1000 + minor * 10


def unavailable_reason(device: torch.device | int | None = None) -> str | None:
    """Why `if_node` cannot work here (None where it can: a CUDA device, a driver >= 12.4, and torch's own IF
    nodes built for CUDA >= 12.4 or the ``set_if`` kernel built)."""
    cu = _libcuda()
    if cu is None or not torch.cuda.is_available():
        return "no CUDA driver"
    version = ctypes.c_int()
    if cu.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value < MIN_DRIVER:
        return f"the CUDA driver ({version.value}) is older than {MIN_DRIVER} (CUDA 12.4)"
    if torch_records_if_nodes():
        built = _version(torch.version.cuda or "0")
        return None if built >= MIN_DRIVER else f"torch was built for CUDA {torch.version.cuda}, before 12.4"
    try:
        if _runtime(_index(device)) is None:
            return f"no libcudadevrt.a found: set {DEVRT_ENV} to its path"
    except GraphIfError as err:
        return f"the set_if kernel could not be built: {err}"
    return None


def available(device: torch.device | int | None = None) -> bool:
    """True where `if_node` works (`unavailable_reason` says why not)."""
    return unavailable_reason(device) is None


def _index(device: torch.device | int | None) -> int:
    if isinstance(device, int):
        return device
    if device is None or device.index is None:
        return torch.cuda.current_device()
    return device.index


def _capture_info(cu: ctypes.CDLL, stream: ctypes.c_void_p) -> tuple[ctypes.c_void_p, ctypes.c_void_p,
                                                                       ctypes.c_void_p, int]:
    """The graph ``stream`` captures into and its current dependencies (nodes, edge data, count)."""
    status, ident, graph = ctypes.c_int(), ctypes.c_uint64(), ctypes.c_void_p()
    deps, edges, n = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_size_t()
    _check(cu.cuStreamGetCaptureInfo_v3(stream, ctypes.byref(status), ctypes.byref(ident), ctypes.byref(graph),
                                        ctypes.byref(deps), ctypes.byref(edges), ctypes.byref(n)),
           "cuStreamGetCaptureInfo")
    if status.value != _CAPTURE_ACTIVE:
        raise GraphIfError("if_node needs the current stream to be capturing a CUDA graph")
    return graph, deps, edges, n.value


@contextlib.contextmanager
def if_node(flag: Tensor) -> Iterator[None]:
    """Inside a CUDA-graph capture on the current stream: what is issued in the block runs at replay only
    where ``flag`` (one bool on the device, as the kernels before it leave it) is True."""
    if flag.dtype != torch.bool or flag.numel() != 1 or not flag.is_cuda:
        raise ValueError(f"if_node takes one bool element on a CUDA device, got {flag.dtype} {tuple(flag.shape)} "
                         f"on {flag.device}")
    if torch_records_if_nodes():
        if not torch.cuda.is_current_stream_capturing():
            raise GraphIfError("if_node needs the current stream to be capturing a CUDA graph")
        capturing = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        capturing.begin_capture_to_if_node(flag)
        try:
            yield
        finally:
            capturing.end_capture_to_conditional_node()
        return
    cu, device = _libcuda(), _index(flag.device)
    rt = _runtime(device)
    assert cu is not None and rt is not None, "if_node needs available() to be True"
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    graph, _, _, _ = _capture_info(cu, stream)
    ctx, handle = ctypes.c_void_p(), ctypes.c_uint64()
    _check(cu.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    _check(cu.cuGraphConditionalHandleCreate(ctypes.byref(handle), graph, ctx, 0, _COND_ASSIGN_DEFAULT),
           "cuGraphConditionalHandleCreate")
    ptr = ctypes.c_uint64(flag.data_ptr())
    args = (ctypes.c_void_p * 2)(ctypes.addressof(handle), ctypes.addressof(ptr))
    _check(cu.cuLaunchKernel(rt.set_if, 1, 1, 1, 1, 1, 1, 0, stream, args, None), "cuLaunchKernel(set_if)")
    graph, deps, edges, n = _capture_info(cu, stream)
    params = _NodeParams(type=_NODE_CONDITIONAL)  # phGraph_out stays NULL: the driver sets it to its own array
    params.u.conditional = _Conditional(handle=handle.value, type=_COND_IF, size=1, ctx=ctx)
    node = ctypes.c_void_p()
    _check(cu.cuGraphAddNode_v2(ctypes.byref(node), graph, deps, edges, ctypes.c_size_t(n), ctypes.byref(params)),
           "cuGraphAddNode(IF)")
    _check(cu.cuStreamUpdateCaptureDependencies_v2(stream, ctypes.byref(node), None, ctypes.c_size_t(1),
                                                    _SET_DEPENDENCIES), "cuStreamUpdateCaptureDependencies")
    body = params.u.conditional.phGraph_out[0]  # the IF node's body graph, owned by the node
    side = rt.body
    side_handle = ctypes.c_void_p(side.cuda_stream)
    _check(cu.cuStreamBeginCaptureToGraph(side_handle, ctypes.c_void_p(body), None, None, ctypes.c_size_t(0),
                                          _CAPTURE_RELAXED), "cuStreamBeginCaptureToGraph")
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        captured = ctypes.c_void_p()
        _check(cu.cuStreamEndCapture(side_handle, ctypes.byref(captured)), "cuStreamEndCapture")
