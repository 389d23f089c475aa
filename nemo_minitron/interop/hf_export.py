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
from nemo_minitron.data.tokenizer import GENERATION_CONFIG
from nemo_minitron.interop.hf_config import hf_config_from_model
from nemo_minitron.interop.hf_weights import hf_tensors
from nemo_minitron.utils.logging import get_logger

log = get_logger("interop")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _token_ids(tokenizer_dir: Path) -> dict[str, int | list[int] | None]:
    """bos/eos/pad/unk ids of the checkpoint's tokenizer (None without one) and every
    end-of-sequence id (``eos_ids``)."""
    from nemo_minitron.data.tokenizer import HFTokenizer, load_tokenizer

    ids: dict[str, int | list[int] | None] = dict.fromkeys(("bos", "eos", "pad", "unk"))
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        return {**ids, "eos_ids": None}
    tok = load_tokenizer(tokenizer_dir)
    if isinstance(tok, HFTokenizer):
        t = tok.tok
        ids.update(bos=t.bos_token_id, eos=tok.eod, pad=t.pad_token_id, unk=t.unk_token_id)
    else:
        sp = tok.sp  # type: ignore[attr-defined]
        ids.update({k: (i if i >= 0 else None) for k, i in
                    (("bos", sp.bos_id()), ("pad", sp.pad_id()), ("unk", sp.unk_id()))})
        ids["eos"] = tok.eod
    eos_ids = tok.eos_ids
    return {**ids, "eos_ids": eos_ids if len(eos_ids) > 1 else eos_ids[0]}


def export_hf(checkpoint: str | os.PathLike[str], hf_dir: str | os.PathLike[str],
              dtype: str = "float32") -> Path:
    """Write ``hf_dir`` from ``checkpoint`` (one process: the full model is gathered at
    TP=1/PP=1 by loading the reshardable checkpoint)."""
    from safetensors.torch import save_file

    from nemo_minitron.checkpoint.io import (
        check_checkpoint,
        has_tokenizer,
        load_model,
        load_model_config,
    )
    from nemo_minitron.checkpoint.layout import tokenizer_dir
    from nemo_minitron.utils.fs import atomic_dir, readable_as_umask

    ckpt = check_checkpoint(checkpoint)
    if Path(hf_dir).exists():
        raise ConfigError(f"output {str(hf_dir)!r} already exists")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("export-hf runs as one process (it loads the full model)")
    cfg = load_model_config(ckpt)
    if not has_tokenizer(ckpt):
        log.warning("checkpoint %s has no tokenizer: %s gets the weights and config only (copy "
                    "the model's tokenizer files into it for transformers' AutoTokenizer)",
                    checkpoint, hf_dir)
    ids = _token_ids(tokenizer_dir(ckpt))
    hf_config = hf_config_from_model(cfg, bos=ids["bos"], eos=ids["eos"], pad=ids["pad"],
                                     unk=ids["unk"], dtype=dtype)
    model, cfg, _ = load_model(ckpt, ParallelConfig())
    tensors = {name: t.detach().to("cpu", DTYPES[dtype]).contiguous()
               for name, t in hf_tensors(model.state_dict(), cfg)}
    with atomic_dir(hf_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        readable_as_umask(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos_ids"],
               "pad_token_id": ids["pad"]}
        (tmp / GENERATION_CONFIG).write_text(json.dumps(
            {k: v for k, v in gen.items() if v is not None}, indent=2) + "\n")
        tok_dir = tokenizer_dir(ckpt)
        if tok_dir.is_dir():
            for f in tok_dir.iterdir():
                if f.is_file() and f.name != GENERATION_CONFIG:  # merged into the one above
                    shutil.copyfile(f, tmp / f.name)
    log.info("exported %s -> %s (%s, %d tensors)", checkpoint, hf_dir,
             hf_config["architectures"][0], len(tensors))
    return Path(hf_dir)
