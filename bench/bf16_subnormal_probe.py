"""Do this GPU's tensor cores keep BF16 subnormal inputs (or flush them to zero)? The question decides a cheaper
BF16 de-quantization: for every format the kernels take (<= 4 exponent bits, <= 7 mantissa bits), the FP16 bit
pattern the de-quantization builds, with its magnitude bits moved 3 places down (sign kept), is exactly the BF16
pattern of the value times 2^-112; FPx subnormals land on BF16 subnormals. Today each BF16 pair costs two
f16 -> f32 conversions and one pack (the small-M loop: 473 instructions per pass against FP16's 281, 2026-12-03).

    python bench/bf16_subnormal_probe.py

Prints whether products of BF16 subnormal weights came out right through torch.matmul in BF16 (cuBLAS, the
tensor cores our kernels' mma.sync / wgmma run on). Needs a CUDA GPU.
"""

from __future__ import annotations

import sys

import torch


def bf16_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int16).view(torch.bfloat16)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    # subnormal BF16: exponent field 0, mantissa 1..127 (values m * 2^-133); x: powers of two large enough that
    # the products are normal float32 numbers
    mantissas = torch.randint(1, 128, (128, 256), dtype=torch.int32)
    w = bf16_from_bits(mantissas).cuda()
    x = torch.full((256, 64), 2.0 ** 100, dtype=torch.bfloat16, device="cuda")
    exact = (w.double() @ x.double())
    out = (w @ x).double()  # cuBLAS BF16 GEMM: tensor cores
    flushed = (out == 0).float().mean().item()
    err = ((out - exact).norm() / exact.norm()).item()
    print(f"{torch.cuda.get_device_name()}: BF16 subnormal weights x 2^100 through torch.matmul: rel err {err:.2e}, "
          f"{flushed:.0%} of outputs zero -> tensor cores {'KEEP' if err < 1e-2 else 'FLUSH'} BF16 subnormal inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
