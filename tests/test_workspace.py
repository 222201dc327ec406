"""kernels/workspace.py: buffers grow (never shrink) outside a capture, and refuse to be made or grown inside one."""

import pytest
import torch

from fp6llm.kernels import workspace
from fp6llm.kernels.fpx_gemm import _placement_consts, _rotation_table
from fp6llm.formats import FPFormat


@pytest.fixture
def capturing(monkeypatch):
    """Pretend a CUDA-graph capture is under way on this (CPU-only) machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_workspace_grows_and_is_reused():
    ws = workspace.SplitWorkspace()
    first, counts = ws.reserve("cpu", 10, 3)
    assert first.numel() >= 10 and counts.numel() >= 3 and not counts.any()
    again, _ = ws.reserve("cpu", first.numel(), 3)
    assert again is first  # fits: the same buffer, the pointer a graph captured stays valid
    bigger, _ = ws.reserve("cpu", first.numel() + 1, 3)
    assert bigger.numel() > first.numel()
    assert ws.reserve("cpu", 10, 3)[0] is bigger  # never shrunk
    assert any(old is first for old, _ in ws.retired)  # outgrown, not freed: a graph captured before may use it


def test_workspace_refuses_to_grow_during_capture(capturing):
    ws = workspace.SplitWorkspace()
    with pytest.raises(RuntimeError, match="during a CUDA-graph capture; run the layer once"):
        ws.reserve("cpu", 10, 3)


def test_workspace_that_fits_is_returned_during_capture(monkeypatch):
    ws = workspace.SplitWorkspace()
    made, _ = ws.reserve("cpu", 10, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert ws.reserve("cpu", 10, 3)[0] is made


def test_rotation_table_is_made_once_and_not_during_capture(monkeypatch):
    fmt = FPFormat.parse("e2m3")
    monkeypatch.setattr(workspace.CONSTANTS, "tensors", {})
    table = _rotation_table(fmt, "cpu")
    assert table.tolist() == [r for plane in _placement_consts(fmt)[3] for slot in plane for r in slot]
    assert _rotation_table(fmt, "cpu") is table
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _rotation_table(fmt, "cpu") is table  # made before the capture: fine
    with pytest.raises(RuntimeError, match="constant table .* during a CUDA-graph capture"):
        _rotation_table(FPFormat.parse("e3m2"), "cpu")
