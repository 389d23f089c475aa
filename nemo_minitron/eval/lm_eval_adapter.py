"""lm-evaluation-harness model over our Megatron checkpoints (``pip install .[eval]``).

``MinitronLM`` is a ``TemplateLM``: lm-eval's own code splits context/continuation and builds
the rolling windows, exactly as for its Hugging Face model (``HFLM``), so the two score the same
token sequences; we only supply the log-probabilities (``model.forward.forward_logits``) and
generation (``eval.generate``, greedy or sampled, with the KV cache). One process, TP=1/PP=1.
Registered as ``nemo_minitron``; run offline with local task files through ``run_lm_eval``.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval import utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs


@register_model("nemo_minitron")
class MinitronLM(TemplateLM):
    """An lm-eval model for ``checkpoint``; ``batch_size`` sequences per forward pass."""

    def __init__(self, checkpoint: str, batch_size: int | str = 8, max_gen_toks: int = 256,
                 **_: Any) -> None:
        super().__init__()
        from nemo_minitron.checkpoint.io import load_checkpoint_tokenizer, load_model
        from nemo_minitron.config import ParallelConfig

        self.tok = load_checkpoint_tokenizer(checkpoint)
        self.model, self.cfg, _ = load_model(checkpoint, ParallelConfig())
        self.model.eval()
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.cfg.seq_length

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: the tokenizer's bos when it has one, else eot.
        inner = getattr(self.tok, "tok", None)
        bos = inner.bos_token_id if inner is not None else self.tok.sp.bos_id()  # type: ignore
        return bos if bos is not None and bos >= 0 else self.eot_token_id

    def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    def _score(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        from nemo_minitron.model.forward import forward_logits

        rows, spans = [], []
        for ctx, cont in batch:
            seq = (ctx + cont)[-(self.max_length + 1):][:-1]
            rows.append(seq)
            spans.append((len(seq) - len(cont), cont))
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # causal: right pad ok
        logprobs = torch.log_softmax(forward_logits(self.model, tokens), dim=-1)
        out = []
        for i, (start, cont) in enumerate(spans):
            lp = logprobs[i, start:start + len(cont)]
            target = torch.tensor(cont)
            out.append((float(lp.gather(-1, target[:, None]).sum()),
                        bool((lp.argmax(-1) == target).all())))
        return out

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        res: list[tuple[float, bool]] = []
        for i in range(0, len(requests), self.batch_size):
            chunk = requests[i:i + self.batch_size]
            scored = self._score([(ctx, cont) for _, ctx, cont in chunk])
            for (key, _, _), r in zip(chunk, scored):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, r)
                res.append(r)
        return res

    def loglikelihood_rolling(self, requests: list[Instance],
                              disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in (r.args for r in requests):
            windows = [(None, *utils.make_disjoint_window(w)) for w in
                       utils.get_rolling_token_windows(
                           token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                           max_seq_len=self.max_length, context_len=1)]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        from nemo_minitron.eval.generate import SamplingConfig, generate

        eos = self.tok_decode([self.eot_token_id])
        res = []
        for context, gen_kwargs in (r.args for r in requests):
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            n = int(kw.pop("max_gen_toks"))
            prompt = self.tok_encode(context)[-(self.max_length - n):]
            temp = float(kw.get("temperature", 0.0) or 0.0)
            sampling = SamplingConfig(max_new_tokens=n, greedy=not kw.get("do_sample") or
                                      temp == 0.0, temperature=temp or 1.0,
                                      stop_tokens=self.tok.eos_ids)
            ids = generate(self.model, [prompt], sampling, vocab_limit=self.tok.vocab_size)[0]
            text = self.tok_decode(ids)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            res.append(text)
        return res


def run_lm_eval(checkpoint: str, tasks: list[str], include_path: str | None = None,
                batch_size: int = 8, limit: int | None = None,
                log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``checkpoint`` on ``tasks`` (local task YAMLs under
    ``include_path``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = MinitronLM(checkpoint, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=log_samples,
                                   task_manager=TaskManager(include_path=include_path))
