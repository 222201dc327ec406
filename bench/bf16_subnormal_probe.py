"""Do this GPU's tensor cores keep BF16 subnormal inputs (or flush them to zero)? The question decides a cheaper
BF16 de-quantization: for every format the kernels take (<= 4 exponent bits, <= 7 mantissa bits), the FP16 bit
pattern the de-quantization builds, with its magnitude bits moved 3 places down (sign kept), is exactly the BF16
pattern of the value times 2^-112; FPx subnormals land on BF16 subnormals. Today each BF16 pair costs two
f16 -> f32 conversions and one pack (the small-M loop: 473 instructions per pass against FP16's 281, 2026-12-03).

    python bench/bf16_subnormal_probe.py

Two cases, both through torch.matmul in BF16 (cuBLAS: the tensor cores our kernels' mma.sync / wgmma run on):
(1) BF16 subnormal weights times 2^100 (products normal float32 numbers): are subnormal inputs kept? (2) what the
kernel would feed them: every e3m2 / e2m3 / e2m1 code as its shifted pattern (value x 2^(bias - 127)) against
activations of unit size, so the products themselves lie in float32's subnormal range (~2^-138 .. 2^-116): are
subnormal products and sums kept? And the same with activations of 1e-3. Only if all are does the cheaper
de-quantization keep FP16-path accuracy. Needs a CUDA GPU.

H200, 2026-12-03: (1) kept, (2) at unit activations kept (rel err 1.7e-3), but the kernel built on it
(mma.sync.m16n8k16 .bf16, fp32 accumulators) lost 67 % of the output at activations of 1e-3 (tests of the small-M
kernel): float32 subnormal products are flushed, so the cheaper de-quantization is unsound and was taken out
(docs/kernel-notes.md, 2026-12-03 sixth session).
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
    kept = err < 1e-2
    from fp6llm.formats import FPFormat, value_table
    for name in ("e3m2", "e2m3", "e2m1"):
        fmt = FPFormat.parse(name)
        table = value_table(fmt, torch.float64)
        codes = torch.randint(0, fmt.num_codes, (512, 1024))
        w = (table[codes] * 2.0 ** (fmt.bias - 127))  # exactly representable in BF16 (<= 7 mantissa bits)
        w16 = w.to(torch.bfloat16)
        assert torch.equal(w16.double(), w), "the shifted values are BF16 numbers"
        for size in (1.0, 1e-3):  # activations of unit size, and small ones (the products 2^-10 lower still)
            x = (torch.randn(1024, 16, dtype=torch.float64) * size).to(torch.bfloat16)
            exact = (table[codes] @ x.double())
            out = (w16.cuda() @ x.cuda()).double().cpu() * 2.0 ** (127 - fmt.bias)  # BF16 output: 2^-8 relative
            err = ((out - exact).norm() / exact.norm()).item()
            ok = err < 1e-2
            kept = kept and ok
            print(f"{name} shifted (value x 2^{fmt.bias - 127}) @ randn x {size:g} through torch.matmul, "
                  f"x 2^{127 - fmt.bias}: rel err {err:.2e} -> {'KEPT' if ok else 'LOST'} (subnormal products)")
    print(f"cheaper BF16 de-quantization: {'SOUND' if kept else 'NOT SOUND'} on this GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
