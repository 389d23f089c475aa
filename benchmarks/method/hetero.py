"""The ``hetero`` section of the method benchmark (issue 34 item 5): at equal parameters,
heterogeneous (per-layer, Puzzle-style) pruning against uniform width pruning, one-shot and
after the same short distillation. The uniform student cuts every layer's MLP to
``FFN_FRACTION`` of the source; the heterogeneous one is the search's choice
(``search.hetero``: block scores on the teacher, the exact solver) under the uniform student's
parameter count, from the default block library (MLP widths 100/75/50/25%, all or half the
query groups, linear and no-op blocks); both from the same importance pass of their seed."""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.method.verdicts import Section, mean_spread, verdict
from nemo_minitron.prune.plan import Target

FFN_FRACTION = 0.5
"""The uniform student's MLP width, as a share of the source's (a constant, not a recipe key:
units are cached per recipe, and a new key would refuse every earlier study's directory)."""


class HeteroSection:
    """Mixed into ``experiments.Experiments`` (``self.st``, ``self.src``, ``self.seeds``)."""

    st: Any
    src: Any
    seeds: list[int]

    def _uniform_target(self) -> Target:
        f = self.src.ffn_hidden_size
        return Target(ffn_hidden_size=max(1, int(f * FFN_FRACTION)), hardware_multiple=1)

    def uniform(self, s: int) -> dict[str, Any]:
        """The uniform student: every layer's MLP cut alike."""
        return self.st.prune(f"hetero-uniform-s{s}", self._uniform_target(), s)

    def hetero_shapes(self, s: int) -> dict[str, Any]:
        """The per-layer shapes the heterogeneous search picks under the uniform student's
        parameter count (block scores on the teacher with seed ``s``'s calibration data)."""
        st = self.st

        def run() -> dict[str, Any]:
            from nemo_minitron.config import ParallelConfig
            from nemo_minitron.parallel.runtime import init_distributed
            from nemo_minitron.search.blocks import BlockLibrary, layer_library, sublayer_options
            from nemo_minitron.search.enumerate import SearchConfig
            from nemo_minitron.search.hetero import block_scores, choose_shapes, make_budget

            init_distributed(ParallelConfig())
            options = sublayer_options(self.src, BlockLibrary(), 1)
            scores, _ = block_scores(st.teacher(), st.recipe.calib, st.data(s), self.src,
                                     options)
            budget = self.uniform(s)["params"]
            shapes = choose_shapes(self.src, layer_library(self.src, options, scores),
                                   make_budget(self.src, SearchConfig(target_params=budget)))
            return {"budget": budget, "shapes": [dataclasses.asdict(x) for x in shapes]}
        return st.unit(f"hetero-shapes-s{s}", run)

    def hetero_student(self, s: int) -> dict[str, Any]:
        from nemo_minitron.config.hetero import LayerShape

        shapes = [LayerShape(**x) for x in self.hetero_shapes(s)["shapes"]]
        return self.st.prune(f"hetero-s{s}", Target(layer_shapes=shapes), s)

    def kd_uniform(self, s: int) -> dict[str, Any]:
        return self.st.distill(f"kd-hetero-uniform-s{s}", self.uniform(s)["checkpoint"], s)

    def kd_hetero(self, s: int) -> dict[str, Any]:
        return self.st.distill(f"kd-hetero-s{s}", self.hetero_student(s)["checkpoint"], s)

    def hetero(self) -> Section:
        u1 = [self.uniform(s)["loss"] for s in self.seeds]
        h1 = [self.hetero_student(s)["loss"] for s in self.seeds]
        uk = [self.kd_uniform(s)["loss"] for s in self.seeds]
        hk = [self.kd_hetero(s)["loss"] for s in self.seeds]
        s0, steps = self.seeds[0], self.st.recipe.retrain.train_iters
        pu, ph = self.uniform(s0)["params"], self.hetero_student(s0)["params"]
        f = self._uniform_target().ffn_hidden_size

        def block(kind: str, size: int | None, letter: str) -> str:
            return f"{letter}{size}" if kind == "full" else kind

        def layers(s: int) -> str:
            return ", ".join(f"{block(x['attention'], x['num_query_groups'], 'G')}/"
                             f"{block(x['mlp'], x['ffn_hidden_size'], 'F')}"
                             for x in self.hetero_shapes(s)["shapes"])
        rows = [[f"uniform: every MLP {self.src.ffn_hidden_size} -> {f}", f"{pu:,}",
                 mean_spread(u1), mean_spread(uk)],
                ["heterogeneous: one block per layer (search)", f"{ph:,}", mean_spread(h1),
                 mean_spread(hk)]]
        v1, v2 = verdict(h1, u1), verdict(hk, uk)
        return {"key": "hetero",
                "title": "Heterogeneous (per-layer) vs uniform width pruning at equal parameters",
                "claim": "at equal parameters, a per-layer shape chosen by block scores prunes "
                         "better than a uniform cut, one-shot and after the same distillation "
                         "(Puzzle, arXiv 2411.19146)",
                "header": ["student", "params", "one-shot loss", f"after {steps} KD steps"],
                "rows": rows, "verdict": f"one-shot: {v1}; after retraining: {v2}",
                "detail": "; ".join(f"seed {s}: per layer (attention/MLP) {layers(s)}"
                                    for s in self.seeds)
                          + f". Source G{self.src.query_groups}/F{self.src.ffn_hidden_size}.",
                "curves": {"uniform (KD)": self.kd_uniform(s0)["curve"],
                           "heterogeneous (KD)": self.kd_hetero(s0)["curve"]}}
