"""`legolm.kernels.graph_if` off the GPU: the driver structures as cuda.h lays them out, where libcudadevrt.a
is looked for, and the checks before any driver call (the IF node itself is tested in test_cuda.py)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from legolm.kernels import graph_if


def test_driver_structures_have_the_layout_of_cuda_h() -> None:
    """Sizes and offsets read from cuda.h (CUDA 12.9 and 13.0 agree) with offsetof: CUgraphNodeParams is 256
    bytes with its union at 16; CUDA_CONDITIONAL_NODE_PARAMS is handle 0, type 8, size 12, phGraph_out 16, ctx 24."""
    assert ctypes.sizeof(graph_if._NodeParams) == 256
    assert graph_if._NodeParams.u.offset == 16
    assert ctypes.sizeof(graph_if._Conditional) == 32
    offsets = [getattr(graph_if._Conditional, f).offset for f in ("handle", "type", "size", "phGraph_out", "ctx")]
    assert offsets == [0, 8, 12, 16, 24]


def test_the_set_kernel_calls_the_device_runtime_with_the_flag_as_0_or_1() -> None:
    ptx = graph_if._PTX.format(arch=90)
    assert ".target sm_90" in ptx and "ld.global.u8" in ptx and "selp.u32 %r2, 1, 0, %p" in ptx
    assert "call.uni cudaGraphSetConditional, (p0, p1);" in ptx


def test_devrt_comes_from_the_variable_when_it_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "libcudadevrt.a"
    monkeypatch.setenv(graph_if.DEVRT_ENV, str(lib))
    assert graph_if.find_devrt() is None  # named but missing: no guessing elsewhere
    lib.write_bytes(b"!<arch>\n")
    assert graph_if.find_devrt() == lib


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_without_cuda_there_are_no_if_nodes() -> None:
    assert not graph_if.available() and graph_if.unavailable_reason() == "no CUDA driver"
    with pytest.raises(ValueError, match="CUDA device"), graph_if.if_node(torch.zeros((), dtype=torch.bool)):
        pass


def test_cuda_versions_compare_in_the_driver_numbering() -> None:
    assert graph_if._version("12.4") == graph_if.MIN_DRIVER == 12040
    assert graph_if._version("13.0") == 13000 and graph_if._version("12.3") < graph_if.MIN_DRIVER


def test_torch_own_if_nodes_are_used_where_torch_records_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose CUDAGraph records IF nodes gets the block between its begin and end calls, and no driver
    call of ours (a stand-in graph and flag: this machine has no GPU)."""
    calls: list[str] = []

    class Capturing:
        def begin_capture_to_if_node(self, flag: object) -> None:
            calls.append(f"begin {flag}")

        def end_capture_to_conditional_node(self) -> None:
            calls.append("end")

    class Graph:
        begin_capture_to_if_node = end_capture_to_conditional_node = None

        @staticmethod
        def get_currently_capturing_graph() -> Capturing:
            return Capturing()

    class Flag:
        dtype, is_cuda, device, shape = torch.bool, True, "cuda:0", ()

        def numel(self) -> int:
            return 1

        def __str__(self) -> str:
            return "flag"

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(graph_if, "_libcuda", lambda: pytest.fail("the driver path ran"))
    assert graph_if.torch_records_if_nodes()
    with graph_if.if_node(Flag()):  # type: ignore[arg-type]
        calls.append("body")
    assert calls == ["begin flag", "body", "end"]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(graph_if.GraphIfError, match="capturing"), graph_if.if_node(Flag()):  # type: ignore[arg-type]
        pass


class _FakeDriver:
    """The driver calls of the ctypes path, answered and checked in Python: each call's arguments as the driver
    would read them (handles, the IF node's parameter struct, the set_if kernel's parameter array)."""

    GRAPH, CTX, HANDLE, BODY, IF_NODE, SET_NODE, LAST_NODE, SET_IF, CAPTURE, SIDE = range(101, 111)

    def __init__(self, capturing: bool = True) -> None:
        self.capturing = capturing
        self.calls: list[str] = []
        self.deps = (ctypes.c_void_p * 1)(self.LAST_NODE)  # the capture's current dependency

    def cuStreamGetCaptureInfo_v3(self, stream, status, ident, graph, deps, edges, n):  # type: ignore[no-untyped-def]
        assert stream.value == self.CAPTURE
        status._obj.value = graph_if._CAPTURE_ACTIVE if self.capturing else 0
        graph._obj.value, deps._obj.value, edges._obj.value, n._obj.value = (
            self.GRAPH, ctypes.addressof(self.deps), None, 1)
        self.calls.append("info")
        return 0

    def cuCtxGetCurrent(self, ctx):  # type: ignore[no-untyped-def]
        ctx._obj.value = self.CTX
        return 0

    def cuGraphConditionalHandleCreate(self, handle, graph, ctx, default, flags):  # type: ignore[no-untyped-def]
        assert (graph.value, ctx.value, default, flags) == (self.GRAPH, self.CTX, 0, graph_if._COND_ASSIGN_DEFAULT)
        handle._obj.value = self.HANDLE
        self.calls.append("handle")
        return 0

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, args, extra):  # type: ignore[no-untyped-def]
        assert fn.value == self.SET_IF and (gx, gy, gz, bx, by, bz, shared) == (1, 1, 1, 1, 1, 1, 0)
        assert stream.value == self.CAPTURE and extra is None
        handle, flag = (ctypes.cast(args[i], ctypes.POINTER(ctypes.c_uint64))[0] for i in range(2))
        assert (handle, flag) == (self.HANDLE, 0xF1A6)
        self.deps[0] = self.SET_NODE  # the launch is captured after the last node
        self.calls.append("set_if")
        return 0

    def cuGraphAddNode_v2(self, node, graph, deps, edges, n, params):  # type: ignore[no-untyped-def]
        p = params._obj
        cond = p.u.conditional
        assert (graph.value, n.value, p.type) == (self.GRAPH, 1, graph_if._NODE_CONDITIONAL)
        assert ctypes.cast(deps, ctypes.POINTER(ctypes.c_void_p))[0] == self.SET_NODE  # after set_if
        assert (cond.handle, cond.type, cond.size, cond.ctx) == (self.HANDLE, graph_if._COND_IF, 1, self.CTX)
        assert not cond.phGraph_out  # an output: CUDA points it at an array it owns
        self.bodies = (ctypes.c_void_p * 1)(self.BODY)
        cond.phGraph_out = ctypes.cast(self.bodies, ctypes.POINTER(ctypes.c_void_p))
        node._obj.value = self.IF_NODE
        self.calls.append("add IF")
        return 0

    def cuStreamUpdateCaptureDependencies_v2(self, stream, nodes, edges, n, flags):  # type: ignore[no-untyped-def]
        assert (stream.value, nodes._obj.value, edges, n.value) == (self.CAPTURE, self.IF_NODE, None, 1)
        assert flags == graph_if._SET_DEPENDENCIES
        self.calls.append("depend on IF")
        return 0

    def cuStreamBeginCaptureToGraph(self, stream, graph, deps, edges, n, mode):  # type: ignore[no-untyped-def]
        assert (stream.value, graph.value, deps, n.value, mode) == (self.SIDE, self.BODY, None, 0,
                                                                      graph_if._CAPTURE_RELAXED)
        self.calls.append("capture body")
        return 0

    def cuStreamEndCapture(self, stream, graph):  # type: ignore[no-untyped-def]
        assert stream.value == self.SIDE
        self.calls.append("end body")
        return 0


def test_the_driver_path_adds_the_if_node_after_set_if_and_captures_the_body_on_the_side_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The ctypes calls of torch 2.11's path, in order and with the arguments the driver reads (no GPU here)."""
    import contextlib

    fake = _FakeDriver()

    class Stream:
        def __init__(self, handle: int) -> None:
            self.cuda_stream = handle

    class Flag:
        dtype, is_cuda, device, shape = torch.bool, True, torch.device("cuda", 0), ()

        def numel(self) -> int:
            return 1

        def data_ptr(self) -> int:
            return 0xF1A6

    @contextlib.contextmanager
    def on(stream: Stream):  # type: ignore[no-untyped-def]
        fake.calls.append(f"stream {stream.cuda_stream}")
        yield

    monkeypatch.setattr(graph_if, "torch_records_if_nodes", lambda: False)
    monkeypatch.setattr(graph_if, "_libcuda", lambda: fake)
    monkeypatch.setattr(graph_if, "_runtime", lambda device: graph_if._Runtime(ctypes.c_void_p(fake.SET_IF),
                                                                               Stream(fake.SIDE)))  # type: ignore[arg-type]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(fake.CAPTURE))
    monkeypatch.setattr(torch.cuda, "stream", on)
    with graph_if.if_node(Flag()):  # type: ignore[arg-type]
        fake.calls.append("body")
    assert fake.calls == ["info", "handle", "set_if", "info", "add IF", "depend on IF", "capture body",
                          f"stream {fake.SIDE}", "body", "end body"]
    idle = _FakeDriver(capturing=False)
    monkeypatch.setattr(graph_if, "_libcuda", lambda: idle)
    with pytest.raises(graph_if.GraphIfError, match="capturing"), graph_if.if_node(Flag()):  # type: ignore[arg-type]
        pass
    assert idle.calls == ["info"]  # nothing added to a graph that is not being captured


@pytest.mark.parametrize(("capability", "target"), [((9, 0), "sm_90"), ((10, 0), "sm_90"), ((8, 6), "sm_86")])
def test_set_if_is_linked_against_the_device_runtime_for_the_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                    capability: tuple[int, int], target: str) -> None:
    """`_runtime` against a fake driver: the PTX for the device's architecture (capped at sm_90, which PTX 7.8
    reaches; the driver JITs it forward), libcudadevrt.a as a library input, the kernel looked up by name."""
    devrt = tmp_path / "libcudadevrt.a"
    devrt.write_bytes(b"!<arch>\n")
    seen: dict[str, object] = {}

    class Link:
        def cuLinkCreate_v2(self, n, opts, values, state):  # type: ignore[no-untyped-def]
            state._obj.value = 1
            return 0

        def cuLinkAddData_v2(self, state, kind, data, size, name, n, opts, values):  # type: ignore[no-untyped-def]
            seen["ptx"] = (kind, data.decode(), size.value, name)
            return 0

        def cuLinkAddFile_v2(self, state, kind, path, n, opts, values):  # type: ignore[no-untyped-def]
            seen["lib"] = (kind, path.decode())
            return 0

        def cuLinkComplete(self, state, cubin, size):  # type: ignore[no-untyped-def]
            cubin._obj.value = 0xC0B1
            return 0

        def cuModuleLoadData(self, module, image):  # type: ignore[no-untyped-def]
            seen["image"] = image.value
            module._obj.value = 0x30D
            return 0

        def cuLinkDestroy(self, state):  # type: ignore[no-untyped-def]
            seen["destroyed"] = True
            return 0

        def cuModuleGetFunction(self, fn, module, name):  # type: ignore[no-untyped-def]
            seen["function"] = (module.value, name)
            fn._obj.value = 0xF
            return 0

        def cuStreamCreate(self, stream, flags):  # type: ignore[no-untyped-def]
            seen["stream flags"] = flags
            stream._obj.value = 0x5EED
            return 0

    monkeypatch.setenv(graph_if.DEVRT_ENV, str(devrt))
    monkeypatch.setattr(graph_if, "_libcuda", lambda: Link())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    # the body stream is the driver's own (not one of torch's pooled streams), wrapped for torch
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda ptr, device: ("external", ptr, device))
    rt = graph_if._runtime.__wrapped__(0)  # type: ignore[attr-defined]
    assert rt is not None and rt.set_if.value == 0xF and rt.body == ("external", 0x5EED, 0)
    assert seen["stream flags"] == graph_if._STREAM_NON_BLOCKING
    kind, ptx, size, name = seen["ptx"]  # type: ignore[misc]
    assert kind == graph_if._JIT_INPUT_PTX and f".target {target}\n" in ptx and size == len(ptx.encode())
    assert name == b"set_if.ptx"
    assert seen["lib"] == (graph_if._JIT_INPUT_LIBRARY, str(devrt))
    assert seen["image"] == 0xC0B1 and seen["destroyed"] and seen["function"] == (0x30D, b"legolm_set_if")


def test_the_devrt_of_torchs_cuda_major_is_preferred(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Both NVIDIA runtime wheels installed (cu12's ``cuda_runtime``, cu13's ``cu13``): torch's CUDA major picks."""
    import importlib.util
    from types import SimpleNamespace

    for folder in ("cuda_runtime", "cu13"):
        (tmp_path / folder / "lib").mkdir(parents=True)
        (tmp_path / folder / "lib" / "libcudadevrt.a").write_bytes(b"!<arch>\n")
    monkeypatch.delenv(graph_if.DEVRT_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    for home in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(home, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert graph_if.find_devrt() == tmp_path / "cu13" / "lib" / "libcudadevrt.a"
    monkeypatch.setattr(torch.version, "cuda", "12.9")  # the CUDA 12 wheel's folder is cuda_runtime
    assert graph_if.find_devrt() == tmp_path / "cuda_runtime" / "lib" / "libcudadevrt.a"
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build: the first one found
    assert graph_if.find_devrt() == tmp_path / "cu13" / "lib" / "libcudadevrt.a"
