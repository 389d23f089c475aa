"""The fixtures of ``tests/test_bad_inputs.py``'s table: the context a case builds its argv from,
and the edits that make a good checkpoint, Hugging Face directory or file corrupt, truncated,
foreign or crafted."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml


@dataclass
class Ctx:
    tmp: Path
    good: Path
    hf: Path
    tiny: list[str]
    prefix: str
    tokenizer: str
    cache: Path

    @property
    def data(self) -> list[str]:
        return [o for o in self.tiny if o.startswith("data.")]

    def other_teachers_cache(self) -> str:
        """A copy of the teacher cache of ``good`` recording another teacher's weights."""
        dst = self.tmp / "cache"
        shutil.copytree(self.cache, dst)
        meta = json.loads((dst / "meta.json").read_text())
        meta["teacher_fingerprint"] = [x * 1.001 for x in meta["teacher_fingerprint"]]
        meta["teacher"] = "runs/teacher/checkpoints/step_0000010"
        (dst / "meta.json").write_text(json.dumps(meta))
        return str(dst)

    def file(self, name: str, content: bytes | str) -> str:
        p = self.tmp / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    def ckpt(self, edit: Callable[[Path], None]) -> str:
        dst = self.tmp / "ck"
        shutil.copytree(self.good, dst)
        (dst / "manifest.json").unlink()  # test the reader, not the checksum
        edit(dst)
        return str(dst)

    def hf_dir(self, edit: Callable[[Path], None]) -> str:
        dst = self.tmp / "hf"
        shutil.copytree(self.hf, dst)
        edit(dst)
        return str(dst)


def _cfg(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _tensor(name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    def edit(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        f = next(d.glob("*.safetensors"))
        sd = load_file(str(f))
        sd[name] = fn(sd[name])
        save_file(sd, str(f), metadata={"format": "pt"})
    return edit


def _qwen2_moe(c: Ctx, **overrides) -> str:
    """A tiny Hugging Face Qwen2-MoE directory (``tests.interop.hfmodels``) in ``c.tmp``."""
    from tests.interop.hfmodels import save_hf_model

    return str(save_hf_model(c.tmp / "qwen2_moe", "qwen2_moe", tokenizer=False, **overrides))


def _decilm(c: Ctx, ffn: int = 33, **attention) -> str:
    """A tiny Hugging Face DeciLM (block-config) directory in ``c.tmp``, written by hand: layer
    0 full (2 query groups, FFN width ``ffn``, ``attention`` added to its attention block),
    layer 1 a no-op attention and a linear MLP."""
    from safetensors.torch import save_file

    d = c.tmp / "decilm"
    d.mkdir()
    blocks = [{"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 2,
                             **attention},
               "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": 1.0,
                       "intermediate_size": ffn}},
              {"attention": {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None},
               "ffn": {"no_op": False, "replace_with_linear": True, "ffn_mult": None}}]
    (d / "config.json").write_text(json.dumps({
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 160,
        "block_configs": blocks}))
    p, shapes = "model.layers.", {"model.embed_tokens.weight": (160, 64), "lm_head.weight":
                                  (160, 64), "model.norm.weight": (64,)}
    shapes.update({p + "0.input_layernorm.weight": (64,), p + "0.self_attn.q_proj.weight":
                   (64, 64), p + "0.self_attn.k_proj.weight": (32, 64),
                   p + "0.self_attn.v_proj.weight": (32, 64), p + "0.self_attn.o_proj.weight":
                   (64, 64), p + "0.post_attention_layernorm.weight": (64,),
                   p + "0.mlp.gate_proj.weight": (ffn, 64), p + "0.mlp.up_proj.weight": (ffn, 64),
                   p + "0.mlp.down_proj.weight": (64, ffn),
                   p + "1.post_attention_layernorm.weight": (64,),
                   p + "1.mlp.linear_mlp.weight": (64, 64)})
    save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(d / "model.safetensors"))
    return str(d)


def _model_yaml(text: str | bytes):
    def edit(d: Path) -> None:
        (d / "model_config.yaml").write_bytes(text.encode() if isinstance(text, str) else text)
    return edit


def _word_tokenizer(d: Path) -> Path:
    """A Hugging Face word-level tokenizer saved in ``d``."""
    from tests.interop.hfmodels import save_tokenizer

    save_tokenizer(d)
    return d


def _hf_tokenizer(d: Path) -> None:
    """The checkpoint's tokenizer replaced by ``_word_tokenizer``."""
    shutil.rmtree(d / "tokenizer")
    _word_tokenizer(d / "tokenizer")


def _model_vocab(vocab_size: int):
    def edit(d: Path) -> None:
        cfg = yaml.safe_load((d / "model_config.yaml").read_text())
        cfg["vocab_size"] = vocab_size
        (d / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    return edit


def _no_tokenizer(d: Path) -> None:
    shutil.rmtree(d / "tokenizer")


def _truncate(rel: str):
    def edit(d: Path) -> None:
        data = (d / rel).read_bytes()
        (d / rel).write_bytes(data[: len(data) // 2])
    return edit


def _run_copy(c: Ctx) -> str:
    """A copy of the run directory that holds ``good`` (a pretraining of the tiny shape)."""
    shutil.copytree(c.good.parent.parent, c.tmp / "run")
    return str(c.tmp / "run")


def _search_out(c: Ctx, rel: str, text: str) -> str:
    """An earlier search's output directory holding ``search/<rel>`` = ``text``."""
    f = c.tmp / "s" / "search" / rel
    f.parent.mkdir(parents=True)
    f.write_text(text)
    return str(c.tmp / "s")


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _hf_tok_dir(c: Ctx, content: bytes) -> Path:
    d = c.tmp / "hftok"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_bytes(content)
    return d
