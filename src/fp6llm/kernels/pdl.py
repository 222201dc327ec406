"""The Triton side of programmatic dependent launch (kernels/launch.py): the first statement of a kernel that takes a
PDL flag."""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel of the stream completed and its writes are visible, then let the next
    grid launch (its CTAs wait likewise). Without: nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
