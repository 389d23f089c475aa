"""The checks a distillation run makes against a teacher cache (its format:
``distill.cache_format``; its loss: ``distill.cache_kl``): same data, shapes and teacher."""

from __future__ import annotations

from typing import Any

import torch

from nemo_minitron.config import ConfigError
from nemo_minitron.distill.cache_format import TeacherCache, data_key
from nemo_minitron.utils.logging import get_logger

log = get_logger("distill.cache")


def check_compatible(cache: TeacherCache, recipe: Any, seq_length: int, vocab_size: int) -> None:
    """One-line errors for a cache that does not fit this distillation run."""
    m, t = cache.meta, recipe.train
    where = f"teacher cache {str(cache.path)!r}"
    if m["seq_length"] != seq_length:
        raise ConfigError(f"{where} has seq_length {m['seq_length']}, the student {seq_length}")
    if m["vocab_size"] != vocab_size:
        raise ConfigError(f"{where}: the teacher's padded vocabulary {m['vocab_size']} differs "
                          f"from the student's {vocab_size}")
    if m["data"] != data_key(recipe):
        raise ConfigError(f"{where} was built with other data settings ({m['data']})")
    need = t.train_iters * t.global_batch_size
    if m["num_samples"] < min(need, m["dataset_len"]):
        raise ConfigError(f"{where} holds {m['num_samples']} samples; train.train_iters x "
                          f"train.global_batch_size = {need} (rebuild it for this run)")
    from nemo_minitron.train.loop import validation_samples

    # A cache from before validation samples were cached has no valid_dataset_len: it has none.
    need = validation_samples(t, m.get("valid_dataset_len", t.eval_iters * t.global_batch_size))
    if m.get("valid_samples", 0) < need:
        raise ConfigError(f"{where} holds {m.get('valid_samples', 0)} validation samples; "
                          f"train.eval_iters x train.global_batch_size = {need} (rebuild it "
                          "for this run, or set train.eval_interval=0)")


def check_teacher(cache: TeacherCache, teacher_ckpt: str, teacher: torch.nn.Module) -> None:
    """One-line error (both fingerprints, both paths) unless ``cache`` was built from the
    weights of ``teacher`` (loaded from ``teacher_ckpt``; collective under TP/PP)."""
    from nemo_minitron.model.params import same_weights, weights_fingerprint

    want = cache.meta.get("teacher_fingerprint")
    have = weights_fingerprint(teacher)
    if want is None:
        log.warning("teacher cache %s records no teacher fingerprint (an older build): that "
                    "it comes from --teacher %s cannot be checked", cache.path, teacher_ckpt)
    elif not same_weights(have, want):
        raise ConfigError(f"teacher cache {str(cache.path)!r} was built from teacher "
                          f"{cache.meta.get('teacher')!r} (weights fingerprint {want}), not "
                          f"from --teacher {teacher_ckpt!r} (fingerprint {have}): rebuild it "
                          f"with `nemo-minitron teacher-cache --teacher {teacher_ckpt}`")
