"""GGUF -> a Hugging Face float checkpoint directory, once, so that every fp6llm path reads it as usual.

transformers' GGUF reader (``from_pretrained(dir, gguf_file=...)``, which needs the ``gguf`` package) de-quantizes
the file's tensors to float32 and rebuilds the config and tokenizer; this module writes them out as
model.safetensors + config.json + the tokenizer files. The weights of a 4-bit GGUF (Q4_0, Q4_1, Q4_K_M) are the
de-quantized 4-bit values: an int4 comparison at the file's own group size is trivially lossless on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

GGUF_MODULE = "gguf"
# Keys of transformers' config that describe the GGUF source, not the model; they would make the directory unusable.
SOURCE_ONLY_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def convert_gguf(gguf_file: Union[str, Path], out_dir: Union[str, Path], dtype: torch.dtype = torch.float32) -> dict:
    """Write the model of ``gguf_file`` as a Hugging Face checkpoint in ``out_dir`` (created if missing).

    dtype: of the written weights (float32 by default: the GGUF's de-quantized values, exactly). Returns
    {"model_type", "tensors", "bytes", "out_dir"}. A tied lm_head is not written (config.json says tied).
    Raises FileNotFoundError for a missing file, ValueError for a file that is not GGUF or an out_dir that is a
    file, ModuleNotFoundError naming the ``gguf`` package when it is missing.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    with open(gguf_file, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{gguf_file} is not a GGUF file (its first bytes are not 'GGUF')")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    try:
        import gguf  # noqa: F401  (transformers needs it; say so before a long load)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"reading GGUF needs the gguf package: pip install {GGUF_MODULE}",
                                  name=GGUF_MODULE) from None
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    config = model.config.to_dict()
    for key in SOURCE_ONLY_KEYS:
        config.pop(key, None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    tied = bool(config.get("tie_word_embeddings"))
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()
               if not (tied and name == "lm_head.weight")}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt", "source": gguf_file.name})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(out_dir)
    return {"model_type": config.get("model_type"), "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()), "out_dir": str(out_dir)}
