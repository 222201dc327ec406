"""Triton kernels (imported only where Triton is available; see ops.py)."""
