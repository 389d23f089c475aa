"""The ``moe`` section of the method benchmark (issue 29 item 7): four ways to cut a
mixture-of-experts teacher to one total parameter count -- remove experts, narrow every expert,
cut the hidden size, remove layers -- one-shot and after a short KD, against the published
ranking on Qwen3-30B-A3B (Model Optimizer PR #467, MMLU without retraining).

The arms share the TOTAL parameter count of the experts arm (as near as each other axis' grid
allows), not the active one: a token still runs ``moe_router_topk`` experts after experts are
removed, so removing experts leaves the active count where it was (less the router's removed
rows) and no expert-removal arm can meet an active budget well below the teacher's. Every row
reports both counts.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.method.runner import Study
from benchmarks.method.verdicts import Section, mean_spread, verdict
from nemo_minitron.config import ConfigError, ModelConfig
from nemo_minitron.model.params import count_params
from nemo_minitron.prune.plan import Target, pruned_config

ARMS = {"experts": "remove experts", "expert_width": "narrow every expert",
        "hidden": "cut the hidden size", "layers": "remove layers"}
"""The arms, in the published ranking's order where it has them (expert width is not in it)."""

PUBLISHED = ("without retraining, removing experts costs least, then removing layers, then "
             "cutting the hidden size (Qwen3-30B-A3B, MMLU: unpruned 78.7, experts 128 -> 96 "
             "74.0, layers 48 -> 40 65.2, hidden 2048 -> 1536 43.6; Model Optimizer PR #467)")


def moe_shape(cfg: ModelConfig) -> str:
    """``L4-H64-E8-EF64``: layers, hidden size, experts and their width."""
    return (f"L{cfg.num_layers}-H{cfg.hidden_size}-E{cfg.num_moe_experts}"
            f"-EF{cfg.expert_ffn_hidden_size}")


def moe_targets(src: ModelConfig, num_moe_experts: int | None, ffn_step: int,
                hidden_step: int) -> dict[str, Target]:
    """The four arms' targets: the experts arm keeps ``num_moe_experts`` (default 3/4 of the
    teacher's); each other arm cuts its one axis to the value whose total count is nearest."""
    if not src.is_moe:
        raise ConfigError("study.sections has moe, which needs a mixture-of-experts teacher: "
                          "set teacher.model.num_moe_experts (or study.teacher to an MoE "
                          "checkpoint)")
    assert src.num_moe_experts is not None
    e = num_moe_experts or 3 * src.num_moe_experts // 4
    if not src.moe_router_topk <= e < src.num_moe_experts:
        raise ConfigError(f"moe.num_moe_experts={e} must be at least model.moe_router_topk="
                          f"{src.moe_router_topk} and below the teacher's {src.num_moe_experts}")
    experts = Target(num_moe_experts=e, hardware_multiple=1)
    want = count_params(pruned_config(src, experts))

    def nearest(name: str, values: range, **extra: Any) -> Target:
        if not values:
            raise ConfigError(f"the moe section's {name} arm has no value below the teacher's")
        return min((Target(**{name: v}, hardware_multiple=1, **extra) for v in values),
                   key=lambda t: abs(count_params(pruned_config(src, t)) - want))

    return {"experts": experts,
            "expert_width": nearest("moe_ffn_hidden_size", range(
                ffn_step, src.expert_ffn_hidden_size, ffn_step)),
            "hidden": nearest("hidden_size", range(hidden_step, src.hidden_size, hidden_step)),
            "layers": nearest("num_layers", range(1, src.num_layers), layer_metric="lm_loss")}


class MoESection:
    """Mixed into ``experiments.Experiments``; units are cached by name like the others."""

    st: Study
    src: ModelConfig
    seeds: list[int]
    teacher_loss: Callable[[], float]

    def moe(self) -> Section:
        st, src, m = self.st, self.src, self.st.recipe.moe
        targets = moe_targets(src, m.num_moe_experts, m.moe_ffn_hidden_size_step,
                              m.hidden_size_step)
        u = self.teacher_loss()
        rows = [["teacher (unpruned)", moe_shape(src), f"{count_params(src):,}",
                 f"{count_params(src, active=True):,}", f"{u:.4f}", "—"]]
        one: dict[str, list[float]] = {}
        kd: dict[str, list[float]] = {}
        curves = {}
        for key, t in targets.items():
            pruned = [st.prune(f"moe-{key}-s{s}", t, s) for s in self.seeds]
            tuned = [st.distill(f"moe-kd-{key}-s{s}", p["checkpoint"], s)
                     for s, p in zip(self.seeds, pruned)]
            one[key], kd[key] = [p["loss"] for p in pruned], [x["loss"] for x in tuned]
            cfg = pruned_config(src, t)
            assert count_params(cfg) == pruned[0]["params"]
            rows.append([ARMS[key], moe_shape(cfg), f"{count_params(cfg):,}",
                         f"{count_params(cfg, active=True):,}", mean_spread(one[key]),
                         mean_spread(kd[key])])
            curves[ARMS[key]] = tuned[0]["curve"]
        pairs = [("experts over layers", "experts", "layers"),
                 ("layers over hidden", "layers", "hidden")]
        v = "; ".join(f"{label} {when}: {verdict(d[a], d[b])}" for when, d in
                      (("one-shot", one), ("after KD", kd)) for label, a, b in pairs)
        return {"key": "moe", "title": "Mixture of experts: what to cut at equal total "
                                       "parameters", "claim": PUBLISHED,
                "header": ["arm", "shape", "total parameters", "active parameters",
                           "one-shot loss", f"after KD ({st.recipe.retrain.train_iters} steps)"],
                "rows": rows, "verdict": v, "curves": curves,
                "detail": self._moe_detail(one, kd)}

    def _moe_detail(self, one: dict[str, list[float]], kd: dict[str, list[float]]) -> str:
        def ranking(d: dict[str, list[float]]) -> str:
            return " < ".join(f"{ARMS[k]} ({statistics.fmean(d[k]):.4f})"
                              for k in sorted(d, key=lambda k: statistics.fmean(d[k])))

        src, r = self.src, self.st.recipe
        return (f"Ranked by mean loss (lowest first), one-shot: {ranking(one)}; after KD: "
                f"{ranking(kd)}. Every arm is pruned from the same {src.num_moe_experts}-expert "
                f"top-{src.moe_router_topk} teacher to about the total parameter count of the "
                f"experts arm (the other axes step by the grid: moe.moe_ffn_hidden_size_step, "
                f"moe.hidden_size_step, whole layers; depth by the contiguous block of least "
                f"LM-loss increase). Equal total, not equal active parameters: removing experts "
                f"leaves a token's {src.moe_router_topk} experts, so its active count stays the "
                f"teacher's (less the router's removed rows), while the other arms also cut "
                f"active parameters: the comparison "
                f"favours the experts arm in compute per token, as the published one does "
                f"(Qwen3-30B-A3B keeps 3B active with 96 of 128 experts). Expert width is not "
                f"in the published ranking. Experts are ranked by the router-weighted output "
                f"norm, channels by activation; KD: the logit loss ({r.kd.divergence} KL) for "
                f"{r.retrain.train_iters} steps of {r.retrain.global_batch_size} sequences, "
                f"the student's router losses kept in its objective. The published figures are "
                f"MMLU accuracy, ours validation loss.")
