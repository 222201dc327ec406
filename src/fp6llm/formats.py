"""Small floating-point formats: sign + e exponent bits + m mantissa bits.

A format ``eXmY`` has bias 2^(e-1) - 1, subnormals (exponent field 0), and no Inf/NaN codes: every one of its
2^(1+e+m) codes is a finite number, as for the FP6/FP4 elements of the OCP Microscaling spec. Its largest value is
2^(2^e - 1 - bias) * (2 - 2^-m).

Code layout (b = 1 + e + m bits, stored in the low bits of a uint8):  ``s | e bits | m bits``, sign on top.
Positive codes 0 .. 2^(b-1) - 1 are in increasing order of value, so the magnitude of a code is its index into the
sorted table of non-negative values; encoding is a search in that table.

OCP MX formats (``MXFormat``: "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1") are one of these element formats plus one
E8M0 scale (a power of two, 2^-127 .. 2^127) per block of 32 consecutive weights along K; see ``mx_exponents``.

Rounding is to nearest, ties to even: on a tie the code whose lowest bit is 0 wins (for m >= 1 that is the even
mantissa, as in IEEE 754; for m = 0 formats it is the even exponent field). Values beyond max_value saturate to
+-max_value. NaN or Inf input raises ValueError. -0.0 encodes to the negative zero code, which decodes to -0.0.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import torch

# Names that mean a format, beyond the eXmY spelling.
ALIASES = {"fp6": "e3m2", "fp5": "e2m2", "fp4": "e2m1"}
MIN_BITS, MAX_BITS = 2, 8
# OCP Microscaling v1.0: one shared E8M0 scale per 32 elements; E8M0 codes 0..254 are 2^(code - 127), 255 is NaN.
MX_BLOCK_SIZE = 32
E8M0_BITS, E8M0_BIAS, E8M0_NAN = 8, 127, 255
MX_ELEMENTS = {"mxfp6_e3m2": (3, 2), "mxfp6_e2m3": (2, 3), "mxfp4_e2m1": (2, 1)}
MX_ALIASES = {"mxfp6": "mxfp6_e3m2", "mxfp4": "mxfp4_e2m1"}


@dataclass(frozen=True)
class FPFormat:
    """A 1 + exp_bits + man_bits floating-point format with subnormals and no Inf/NaN."""

    exp_bits: int
    man_bits: int

    def __post_init__(self):
        if not isinstance(self.exp_bits, int) or not isinstance(self.man_bits, int):
            raise TypeError(f"exp_bits and man_bits must be ints, got {self.exp_bits!r}, {self.man_bits!r}")
        if self.exp_bits < 1 or self.man_bits < 0 or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"unsupported format e{self.exp_bits}m{self.man_bits}: need exp_bits >= 1, man_bits >= 0 and "
                f"{MIN_BITS} <= 1 + exp_bits + man_bits <= {MAX_BITS}"
            )

    @classmethod
    def parse(cls, name: "str | FPFormat") -> "FPFormat":
        """``FPFormat.parse("e3m2")``; also "fp6" (= e3m2), "fp5" (= e2m2), "fp4" (= e2m1), case-insensitive."""
        if isinstance(name, FPFormat):
            return name
        if not isinstance(name, str):
            raise TypeError(f"format name must be a str or FPFormat, got {type(name).__name__}")
        key = ALIASES.get(name.strip().lower(), name.strip().lower())
        match = re.fullmatch(r"e(\d)m(\d)", key)
        if match is None:
            raise ValueError(
                f"unknown format {name!r}: use eXmY with 2 <= 1+X+Y <= 8 and X >= 1 (e3m2, e2m3, e2m2, e3m1, "
                f"e2m1, e4m3, ...) or one of {', '.join(sorted(ALIASES))}"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def name(self) -> str:
        return f"e{self.exp_bits}m{self.man_bits}"

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def max_value(self) -> float:
        return 2.0 ** (2**self.exp_bits - 1 - self.bias) * (2.0 - 2.0**-self.man_bits)

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.man_bits)

    @property
    def num_codes(self) -> int:
        return 2**self.bits

    def __str__(self) -> str:
        return self.name


def resolve_device(device=None) -> torch.device:
    """``device`` as a torch.device; None: CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# Weight formats that quantize nothing: plain float weights of that dtype.
UNQUANTIZED = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_FORMAT = "e3m2"


@dataclass(frozen=True)
class WeightFormat:
    """How a model's weights are stored: parsed once where the user's words come in (``WeightFormat.parse``: the
    CLI, fp6llm.load, the public loaders) and passed down as this value, never re-parsed.

    quantized: the FPFormat of every Linear but lm_head, or None for plain float weights. dtype: of the activations
    and of what stays unquantized (norms, embeddings, lm_head); of every weight when quantized is None. group_size:
    one scale per that many input columns, None for one per output channel (always None for float weights). head:
    lm_head's own FPFormat (per-channel scales), None to keep it float: spelt "e3m2+head=e2m5". lm_head is a large
    share of the bytes of a decode step where the vocabulary is (Llama-3's 128256 x 4096: 1.05 GB in float16
    beside ~5.2 GB of FP6 blocks), and an 8-bit e2m5 head cost +0.02 % perplexity on SmolLM2 (docs/quality.md).
    """

    quantized: "FPFormat | None"
    dtype: torch.dtype
    group_size: "int | None" = None
    head: "FPFormat | None" = None

    @classmethod
    def parse(cls, name: "str | FPFormat | WeightFormat | None" = None, dtype: "torch.dtype | None" = None,
              device=None, group_size: "int | None" = None) -> "WeightFormat":
        """name: an FPFormat or its name ("e3m2", "fp6", ...; default e3m2), or "fp16" / "bf16" / "fp32" for float
        weights of that dtype (dtype, if given, must agree); either followed by "+head=FORMAT" for an lm_head in
        that FPx format ("e3m2+head=e2m5"). dtype default: float16 on CUDA (``device``, default CUDA when
        available), float32 elsewhere. A WeightFormat comes back as it is. Raises ValueError naming the
        format for an unknown name, a dtype that contradicts it, or a group size without quantization."""
        if isinstance(name, WeightFormat):
            if dtype not in (None, name.dtype) or group_size not in (None, name.group_size):
                raise ValueError(f"{name.name} weights are {name.dtype} with group_size={name.group_size}, not "
                                 f"dtype={dtype}, group_size={group_size}")
            return name
        if isinstance(name, str) and "+" in name:
            body, _, head = name.partition("+")
            key, equals, value = head.partition("=")
            if key.strip().lower() != "head" or not equals or not value.strip():
                raise ValueError(f"format {name!r}: after '+' comes head=FORMAT (an lm_head format, e.g. "
                                 f"e3m2+head=e2m5), not {head!r}")
            try:
                head_format = FPFormat.parse(value.strip())
            except ValueError as err:
                raise ValueError(f"format {name!r}: lm_head format: {err}") from None
            return replace(cls.parse(body, dtype, device, group_size), head=head_format)
        key = name.strip().lower() if isinstance(name, str) else None
        if key in UNQUANTIZED:
            if dtype is not None and dtype != UNQUANTIZED[key]:
                raise ValueError(f"format {name!r} keeps {UNQUANTIZED[key]} weights but dtype={dtype} was asked for")
            if group_size is not None:
                raise ValueError(f"group_size={group_size} needs a quantized format, not {name!r}")
            return cls(None, UNQUANTIZED[key])
        try:
            quantized = FPFormat.parse(DEFAULT_FORMAT if name is None else name)
        except ValueError as err:
            raise ValueError(f"{err}, or fp16 / bf16 / fp32 for unquantized weights") from None
        if dtype is None:
            dtype = torch.float16 if resolve_device(device).type == "cuda" else torch.float32
        return cls(quantized, dtype, group_size)

    @classmethod
    def parse_list(cls, names: list, group_size: "int | None" = None, device=None) -> list:
        """Formats to compare ("fp16", "e3m2", ..., or WeightFormats, which stay as they are), each parsed once;
        group_size is the quantized ones' (float weights have no scales)."""
        return [cls.parse(name, None, device, None if cls.is_float(name) else group_size) for name in names]

    @staticmethod
    def is_float(name: "str | WeightFormat") -> bool:
        """Whether a format (or its name) means unquantized weights ("fp16", "bf16", "fp32")."""
        if isinstance(name, WeightFormat):
            return name.quantized is None
        return isinstance(name, str) and name.strip().lower() in UNQUANTIZED

    @classmethod
    def float_weights(cls, dtype: torch.dtype) -> "WeightFormat":
        """Plain float weights of ``dtype``; ValueError unless it is float16, bfloat16 or float32."""
        names = {value: key for key, value in UNQUANTIZED.items()}
        if dtype not in names:
            raise ValueError(f"float weights are float16, bfloat16 or float32, not {dtype}")
        return cls(None, dtype)

    @property
    def name(self) -> str:
        """The format's one spelling: "e3m2" (also for "fp6"), or "fp16" / "bf16" / "fp32" for float weights, then
        "+head=e2m5" where lm_head has a format of its own."""
        return self.body_name + ("" if self.head is None else f"+head={self.head.name}")

    @property
    def body_name(self) -> str:
        """The spelling of the format of every Linear but lm_head ("e3m2", "fp16", ...)."""
        if self.quantized is not None:
            return self.quantized.name
        return {value: key for key, value in UNQUANTIZED.items()}[self.dtype]

    def __str__(self) -> str:
        return self.name


def code_value(code: int, fmt: FPFormat) -> float:
    """The exact value of one code, from the definition (used to build tables and by tests)."""
    sign = -1.0 if code >> (fmt.bits - 1) & 1 else 1.0
    exp_field = (code >> fmt.man_bits) & (2**fmt.exp_bits - 1)
    mantissa = code & (2**fmt.man_bits - 1)
    if exp_field == 0:
        return sign * fmt.min_subnormal * mantissa
    return sign * 2.0 ** (exp_field - fmt.bias) * (1.0 + mantissa / 2**fmt.man_bits)


@functools.lru_cache(maxsize=None)
def _value_table(fmt: FPFormat) -> tuple[float, ...]:
    return tuple(code_value(c, fmt) for c in range(fmt.num_codes))


def value_table(fmt: "str | FPFormat", dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """All 2^bits code values, indexed by code."""
    fmt = FPFormat.parse(fmt)
    return torch.tensor(_value_table(fmt), dtype=dtype, device=device)


def _check_finite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{what} has {int(bad.sum())} NaN/Inf value(s), the first at index {first}: {x[first].item()}"
        )


def encode(x: torch.Tensor, fmt: "str | FPFormat" = "e3m2") -> torch.Tensor:
    """Round a float tensor to the nearest code of ``fmt`` (ties to even, saturating); returns uint8 codes.

    x: any shape, float16/bfloat16/float32/float64. Raises ValueError on NaN/Inf, TypeError on non-float input.
    """
    fmt = FPFormat.parse(fmt)
    if not torch.is_floating_point(x):
        raise TypeError(f"encode needs a floating-point tensor, got {x.dtype}")
    _check_finite(x, "encode input")
    # float32 holds fp16/bf16/fp32 inputs and every midpoint exactly; float64 inputs stay float64 so that no
    # double rounding can move a tie.
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    mag = x.to(work).abs()
    positives = value_table(fmt, work, x.device)[: fmt.num_codes // 2]
    midpoints = (positives[1:] + positives[:-1]) / 2
    # index = number of midpoints <= mag: the nearest code, with ties sent up ...
    index = torch.bucketize(mag, midpoints, right=True)
    # ... and a tie sent back down when the lower neighbour is the even code.
    lower = (index - 1).clamp(min=0)
    tie = (index > 0) & (mag == midpoints[lower.clamp(max=len(midpoints) - 1)]) & (index % 2 == 1)
    index = torch.where(tie, lower, index)
    sign = torch.signbit(x).to(torch.int64) << (fmt.bits - 1)
    return (index | sign).to(torch.uint8)


def decode(codes: torch.Tensor, fmt: "str | FPFormat" = "e3m2") -> torch.Tensor:
    """Exact values of ``codes`` (uint8 or any integer dtype, values < 2^bits) as float32."""
    fmt = FPFormat.parse(fmt)
    if torch.is_floating_point(codes) or codes.dtype == torch.bool:
        raise TypeError(f"decode needs integer codes, got {codes.dtype}")
    index = codes.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= fmt.num_codes):
        raise ValueError(
            f"codes out of range for {fmt.name}: found {int(index.min())}..{int(index.max())}, "
            f"valid 0..{fmt.num_codes - 1}"
        )
    return value_table(fmt, torch.float32, codes.device)[index]


@dataclass(frozen=True)
class MXFormat:
    """An OCP MX format: ``element`` codes (FP6 E3M2 / E2M3, FP4 E2M1) and one E8M0 scale per MX_BLOCK_SIZE of K."""

    element: FPFormat
    block_size: int = MX_BLOCK_SIZE
    scale_bits: int = E8M0_BITS

    @classmethod
    def parse(cls, name: "str | MXFormat") -> "MXFormat":
        """"mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1" (also "mxfp6" = E3M2, "mxfp4"), case-insensitive."""
        if isinstance(name, MXFormat):
            return name
        key = str(name).strip().lower().replace("-", "_")
        key = MX_ALIASES.get(key, key)
        if key not in MX_ELEMENTS:
            raise ValueError(f"unknown MX format {name!r}; valid: {', '.join(MX_ELEMENTS)}")
        return cls(FPFormat(*MX_ELEMENTS[key]))

    @property
    def name(self) -> str:
        return f"mxfp{self.element.bits}_{self.element.name}"

    @property
    def element_emax(self) -> int:
        """Exponent of the element format's largest normal value (OCP's emax_elem): 4 for E3M2, 2 for E2M3/E2M1."""
        return 2**self.element.exp_bits - 1 - self.element.bias

    def __str__(self) -> str:
        return self.name


def parse_weight_format(name: "str | FPFormat | MXFormat") -> "FPFormat | MXFormat":
    """An FPFormat ("e3m2", "fp6", ...) or an MXFormat ("mxfp6_e2m3", ...) from its name; ValueError otherwise."""
    if isinstance(name, (FPFormat, MXFormat)):
        return name
    if isinstance(name, str) and name.strip().lower().startswith("mx"):
        return MXFormat.parse(name)
    return FPFormat.parse(name)


def mx_exponents(absmax: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    """The shared exponent X of each block, int32, as OCP MX v1.0 computes it from the block's largest |value|.

    X = floor(log2(absmax)) - emax_elem, clamped to E8M0's range [-127, 127]; an all-zero block gets -127. The block's
    elements are then encode(v / 2^X) (values above the element's max saturate, as the spec allows).
    """
    _check_finite(absmax, "MX block absmax")
    exponents = torch.frexp(absmax.float())[1] - 1 - fmt.element_emax  # frexp: absmax = f * 2^e, 0.5 <= f < 1
    exponents = torch.where(absmax > 0, exponents, torch.full_like(exponents, -E8M0_BIAS))
    return exponents.clamp(-E8M0_BIAS, E8M0_NAN - 1 - E8M0_BIAS).to(torch.int32)


def e8m0_encode(exponents: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes of integer exponents in [-127, 127] (code = X + 127); ValueError outside that range."""
    if torch.is_floating_point(exponents):
        raise TypeError(f"e8m0_encode needs integer exponents, got {exponents.dtype}")
    if exponents.numel() and (int(exponents.min()) < -E8M0_BIAS or int(exponents.max()) > E8M0_NAN - 1 - E8M0_BIAS):
        raise ValueError(f"E8M0 exponents must be in [-127, 127], got {int(exponents.min())}..{int(exponents.max())}")
    return (exponents.to(torch.int32) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 2^(code - 127) of uint8 E8M0 codes; code 255 decodes to NaN (the format's one special value)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"e8m0_decode needs uint8 codes, got {codes.dtype}")
    values = torch.ldexp(torch.ones(codes.shape, dtype=torch.float32, device=codes.device),
                         codes.to(torch.int32) - E8M0_BIAS)
    return torch.where(codes == E8M0_NAN, torch.full_like(values, float("nan")), values)
