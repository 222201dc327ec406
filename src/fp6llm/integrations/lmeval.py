"""fp6llm as an lm-evaluation-harness model: ``--model fp6llm --model_args pretrained=DIR,format=e3m2``.

lm-eval finds models in its registry, which this module fills (``register_model("fp6llm")``) when imported; its
command line imports no plug-ins, so run it through this module, which registers the model and then hands every
argument to lm-eval's own command line::

    python -m fp6llm.integrations.lmeval run --model fp6llm --model_args pretrained=DIR,format=e3m2 \
        --tasks wikitext --batch_size 8

(from Python: ``import fp6llm.integrations.lmeval`` before ``lm_eval.simple_evaluate(model="fp6llm", ...)``).
model_args: pretrained (a Hugging Face or fp6llm packed directory, or random:NAME; default the embedded model),
format, group_size, device, dtype (float16 / bfloat16 / float32), max_length (default min(max positions, 2048)).

Scoring runs the decoder's forward on right-padded batches of up to batch_size rows, sorted longest first;
generate_until runs fp6llm's Engine (greedy unless the task samples) and cuts each completion at its stop strings.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..engine import Engine, ModelSource
from ..engine.generate import DEFAULT_MAX_SEQ_LEN, drop_caches
from ..engine.load import DTYPES, check_fits
from ..formats import resolve_device

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until


@torch.inference_mode()
def score_continuations(model, rows: list, device) -> list:
    """[(summed log-probability of the last ``n`` tokens, whether each was the argmax)] for rows [(ids, n)].

    The model reads each row's ids but the last from position 0 (the last token is only predicted); the KV cache
    is set up for the batch and dropped afterwards. len(ids) - 1 must fit the model's positions; 1 <= n < len(ids).
    """
    width = max(len(ids) for ids, _ in rows) - 1
    tokens = torch.zeros(len(rows), width + 1, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        tokens[i, :len(ids)] = torch.tensor(ids)  # right padding: causal attention never looks at it
    model.setup_caches(len(rows), width, device=device)
    try:
        logits = model(tokens[:, :-1].to(device), torch.arange(width, device=device).expand(len(rows), -1))
    finally:
        drop_caches(model)
    results = []
    for i, (ids, n) in enumerate(rows):
        # logits at position p predict token p + 1: the last n tokens are predicted at len - n - 1 .. len - 2
        logprobs = F.log_softmax(logits[i, len(ids) - n - 1:len(ids) - 1].float(), dim=-1)
        targets = tokens[i, len(ids) - n:len(ids)].to(logprobs.device)
        picked = logprobs.gather(1, targets[:, None]).sum().item()
        results.append((picked, bool((logprobs.argmax(dim=-1) == targets).all())))
    return results


@register_model("fp6llm")
class FP6LLM(TemplateLM):
    """An fp6llm model (any format of fp6llm.load) behind lm-eval's loglikelihood / rolling / generate_until."""

    def __init__(self, pretrained: Optional[str] = None, format: Optional[str] = None,
                 group_size: Optional[int] = None, device: Optional[str] = None, dtype: Optional[str] = None,
                 batch_size=DEFAULT_BATCH_SIZE, max_length: Optional[int] = None, **kwargs):
        super().__init__()
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(f"device {device!r} asked for (lm-eval's default) but CUDA is not available: using the CPU")
            device = "cpu"
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        auto = batch_size is None or str(batch_size).startswith("auto")  # lm-eval's "auto" / "auto:N": our default
        if not auto and not (str(batch_size).isdigit() and int(batch_size) >= 1):
            raise ValueError(f"batch_size must be a positive int or auto, got {batch_size!r}")
        self.batch_size = DEFAULT_BATCH_SIZE if auto else int(batch_size)
        source = ModelSource.parse(pretrained)
        device = resolve_device(device)
        weight_format = source.weight_format(format, None if group_size is None else int(group_size),
                                             None if dtype is None else DTYPES[dtype], device)
        config = source.config()
        self.max_length = int(max_length or min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN))
        if not 2 <= self.max_length <= config.max_position_embeddings:
            raise ValueError(f"max_length {self.max_length} must be in 2..{config.max_position_embeddings} (the "
                             f"model's max_position_embeddings)")
        check_fits(config, weight_format, device, self.batch_size, self.max_length)
        self.fp6llm_tokenizer = source.tokenizer(config)
        self.model = source.load_model(weight_format, device, progress=False)
        self._device = next(p for p in self.model.parameters() if p.is_floating_point()).device
        eos = sorted(config.eos_token_ids) or sorted(self.fp6llm_tokenizer.eos_token_ids)
        if not eos:
            raise ValueError(f"{source.name} names no end-of-sequence token (lm-eval needs one)")
        self._eot = eos[0]
        start = self.fp6llm_tokenizer.encode("")
        self._bos = start[0] if start else None  # the token the tokenizer starts every text with, if any

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._eot if self._bos is None else self._bos

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list:
        ids = self.fp6llm_tokenizer.encode(string)
        if add_special_tokens is False and self._bos is not None and ids[:1] == [self._bos]:
            return ids[1:]
        return ids

    def tok_decode(self, ids) -> str:
        return self.fp6llm_tokenizer.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """(log P(continuation | context), greedy?) per request ((strings), context ids, continuation ids); a
        context longer than max_length keeps its last tokens."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]  # max_length tokens are read
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), desc="fp6llm loglikelihood", disable=disable_tqdm):
            batch = order[start:start + self.batch_size]
            for i, result in zip(batch, score_continuations(self.model, [rows[i] for i in batch], self._device)):
                results[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Summed log-probability of each whole text, in disjoint windows of max_length predictions (each window's
        first prediction sees the previous token). A text the tokenizer starts with BOS is predicted after it."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text)
            prefix = self.prefix_token_id
            if self._bos is not None and ids[:1] == [self._bos]:
                prefix, ids = ids[0], ids[1:]
            for window in get_rolling_token_windows(ids, prefix, self.max_length, context_len=1):
                context, continuation = make_disjoint_window(window)
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Each context's completion, batched through an Engine, cut before the first of its ``until`` strings."""
        groups: dict = {}
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(index)
        outputs: list = [None] * len(requests)
        engine = Engine(self.model, self.fp6llm_tokenizer, self.batch_size, self.max_length)
        try:
            for indices in tqdm(groups.values(), desc="fp6llm generate_until", disable=disable_tqdm):
                gen_kwargs = dict(requests[indices[0]].args[1])
                until = gen_kwargs.get("until") or [self.tok_decode([self._eot])]
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
                if not 1 <= max_new < self.max_length:
                    raise ValueError(f"max_gen_toks {max_new} must be in 1..{self.max_length - 1} (max_length)")
                temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in indices]
                texts = engine.generate(prompts, max_new, temperature, seed=gen_kwargs.get("seed"))
                for i, text in zip(indices, texts):
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        finally:
            engine.close()
        return outputs


def main() -> None:
    """lm-eval's command line with the fp6llm model registered."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
