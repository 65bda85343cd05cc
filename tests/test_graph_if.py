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
