"""Our Megatron ``GPTModel`` on CPU against transformers' ``LlamaForCausalLM``
(``attn_implementation="sdpa"``) of the same shape and weights, fp32: forward+backward (LM
loss) and forward-only time, with Megatron's local attention and with SDPA attention
(``build_model(attention=...)``), all variants interleaved within every repeat. Prints
transformers' time / ours per repeat as median and spread (goal: >= 1.0).

    .venv/bin/python benchmarks/cpu_speed.py [--shape demo] [--tokens 8x256] [--repeats 5]

``--shape tiny`` is a seconds-long dry run. One process, TP=1; the three models are checked
to give the same logits before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved, ratios, stat  # noqa: E402

DEMO = dict(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
            num_query_groups=4, seq_length=256, vocab_size=4096)
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, seq_length=32, vocab_size=256)
SHAPES = {"demo": DEMO, "tiny": TINY}
ATTENTIONS = ("local", "sdpa")


def hf_model(cfg, state_dict: dict) -> torch.nn.Module:
    """transformers' Llama (SDPA attention) holding the weights of our ``state_dict``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nemo_minitron.interop.hf_config import hf_config_from_model
    from nemo_minitron.interop.hf_weights import hf_tensors

    conf = LlamaConfig(**hf_config_from_model(cfg, bos=None, eos=None))
    model = AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa",
                                             dtype=torch.float32)
    model.load_state_dict(dict(hf_tensors(state_dict, cfg)), strict=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="demo", choices=sorted(SHAPES),
                    help="demo: L4-H256-F768, 8 heads / 4 groups, vocab 4096; tiny: dry run")
    ap.add_argument("--tokens", default="8x256", help="BATCHxSEQ tokens per step")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (after a warm-up)")
    args = ap.parse_args()
    batch, seq = (int(x) for x in args.tokens.split("x"))

    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed, shutdown

    init_distributed(ParallelConfig())
    cfg = ModelConfig(**dict(SHAPES[args.shape], seq_length=seq))
    ours = {"local": build_model(cfg, attention="local")}
    ours["sdpa"] = build_model(cfg, attention="sdpa")
    ours["sdpa"].load_state_dict(ours["local"].state_dict(), strict=True)
    hf = hf_model(cfg, ours["local"].state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq),
                           generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, 1)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)

    with torch.no_grad():
        ref = hf(tokens, use_cache=False).logits
        for name, m in ours.items():
            err = (m(tokens, pos, None) - ref).abs().max().item()
            if err > 1e-3:
                sys.exit(f"error: {name} logits differ from transformers' by {err:.2e}")

    def ours_fb(m: torch.nn.Module):
        def run() -> None:
            m.zero_grad(set_to_none=True)
            m(tokens, pos, None, labels=labels).float().mean().backward()
        return run

    def ours_f(m: torch.nn.Module):
        def run() -> None:
            with torch.no_grad():
                m(tokens, pos, None)
        return run

    def hf_fb() -> None:
        hf.zero_grad(set_to_none=True)
        # Labels unshifted: transformers shifts them inside, so both losses cover the batch.
        hf(tokens, labels=tokens, use_cache=False).loss.backward()

    def hf_f() -> None:
        with torch.no_grad():
            hf(tokens, use_cache=False)

    runs = {"hf fwd+bwd": hf_fb, "hf fwd": hf_f}
    for name, m in ours.items():
        runs[f"{name} fwd+bwd"] = ours_fb(m)
        runs[f"{name} fwd"] = ours_f(m)
    t = interleaved(runs, args.repeats)
    shape = SHAPES[args.shape]
    print(f"CPU speed, fp32, {args.shape} (L{shape['num_layers']}-H{shape['hidden_size']}-"
          f"F{shape['ffn_hidden_size']}, {shape['num_attention_heads']} heads / "
          f"{shape['num_query_groups']} groups, vocab {shape['vocab_size']}), {batch} x {seq} "
          f"tokens, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats:")
    for name, series in t.items():
        print(f"  {name:14s} {stat(series).fmt(' ms', 1000, 1)}")
    print("transformers' time / ours (goal >= 1.0):")
    for kind in ("fwd+bwd", "fwd"):
        for att in ATTENTIONS:
            r = stat(ratios(t[f"hf {kind}"], t[f"{att} {kind}"]))
            print(f"  {kind:7s} {att:5s} attention: {r.fmt()}")
    shutdown()


if __name__ == "__main__":
    main()
