"""``export-hf``: our checkpoint (any layout it was saved under, pruned or not) -> a Hugging Face
directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads: ``config.json``,
``model.safetensors`` and the tokenizer files. The directory is built aside and renamed into
place, so it exists only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from nemo_minitron.config import ConfigError, ParallelConfig
from nemo_minitron.interop.hf_config import hf_config_from_model
from nemo_minitron.interop.hf_weights import hf_tensors
from nemo_minitron.utils.logging import get_logger

log = get_logger("interop")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _token_ids(tokenizer_dir: Path) -> tuple[int | None, int | None]:
    """(bos, eos) of the checkpoint's tokenizer, if it has one."""
    from nemo_minitron.data.tokenizer import HFTokenizer, load_tokenizer

    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        return None, None
    tok = load_tokenizer(tokenizer_dir)
    if isinstance(tok, HFTokenizer):
        return tok.tok.bos_token_id, tok.eod
    bos = tok.sp.bos_id()  # type: ignore[attr-defined]
    return (bos if bos >= 0 else None), tok.eod


def export_hf(checkpoint: str | os.PathLike[str], hf_dir: str | os.PathLike[str],
              dtype: str = "float32") -> Path:
    """Write ``hf_dir`` from ``checkpoint`` (one process: the full model is gathered at
    TP=1/PP=1 by loading the reshardable checkpoint)."""
    from safetensors.torch import save_file

    from nemo_minitron.checkpoint.io import check_checkpoint, load_model, load_model_config
    from nemo_minitron.utils.fs import atomic_dir

    ckpt = check_checkpoint(checkpoint)
    if Path(hf_dir).exists():
        raise ConfigError(f"output {str(hf_dir)!r} already exists")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("export-hf runs as one process (it loads the full model)")
    cfg = load_model_config(ckpt)
    bos, eos = _token_ids(ckpt / "tokenizer")
    hf_config = hf_config_from_model(cfg, bos=bos, eos=eos, dtype=dtype)
    model, cfg, _ = load_model(ckpt, ParallelConfig())
    tensors = {name: t.detach().to("cpu", DTYPES[dtype]).contiguous()
               for name, t in hf_tensors(model.state_dict(), cfg)}
    with atomic_dir(hf_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = {"bos_token_id": bos, "eos_token_id": eos}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok_dir = ckpt / "tokenizer"
        if tok_dir.is_dir():
            for f in tok_dir.iterdir():
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
    log.info("exported %s -> %s (%s, %d tensors)", checkpoint, hf_dir,
             hf_config["architectures"][0], len(tensors))
    return Path(hf_dir)
