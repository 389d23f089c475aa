"""Importance on the real Megatron model: a torch-only recomputation of the MLP, norm and block
scores and of the angular distances from hidden states captured with plain hooks, and
identical scores under TP=2 and PP=2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import in_order, spawn

CFG = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
           num_query_groups=4, seq_length=32, vocab_size=256)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))


def _block_capture(captured: dict[str, list[torch.Tensor]], i: int):
    def hook(_mod, args, kwargs, out):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured.setdefault(f"block_in.{i}", []).append(x.detach())
        captured.setdefault(f"block_out.{i}", []).append(
            (out[0] if isinstance(out, tuple) else out).detach())
    return hook


def score_job(out: str, tp: int, pp: int, ckpt_in: str | None, ckpt_out: str | None) -> None:
    from nemo_minitron.checkpoint.io import load_weights, save_checkpoint
    from nemo_minitron.config import ModelConfig, ParallelConfig
    from nemo_minitron.importance.estimator import estimate_importance
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp), seed=3)
    cfg = ModelConfig(**CFG)
    model = build_model(cfg)
    if ckpt_in:
        load_weights(ckpt_in, model)
    captured: dict[str, list[torch.Tensor]] = {}
    if tp == 1 and pp == 1:  # capture what the reference recomputation starts from
        for i, layer in enumerate(model.decoder.layers):
            for name in ("input_layernorm", "pre_mlp_layernorm"):
                getattr(layer, name).register_forward_hook(
                    lambda m, a, o, key=f"{name}.{i}": captured.setdefault(key, []).append(o))
            layer.register_forward_hook(_block_capture(captured, i), with_kwargs=True)
            layer.register_forward_pre_hook(  # the hidden state entering layer i
                lambda m, a, kw, key=f"enter.{i}": captured.setdefault(key, []).append(
                    kw["hidden_states"].clone()), with_kwargs=True)
        model.decoder.final_layernorm.register_forward_pre_hook(  # entering the final norm
            lambda m, a, key=f"enter.{CFG['num_layers']}": captured.setdefault(key, []).append(
                a[0].clone()))
    scores = estimate_importance(model, _tokens(), micro_batch_size=4)
    if ckpt_out:
        save_checkpoint(ckpt_out, model, model_cfg=cfg, tokenizer=None)
    if torch.distributed.get_rank() == 0:
        scores.save(out)
        if captured:
            fc1 = [layer.mlp.linear_fc1.weight.detach() for layer in model.decoder.layers]
            torch.save({"captured": {k: torch.cat(v, 1) for k, v in captured.items()},
                        "fc1": fc1}, out + ".ref")


def user_loop_job(out: str, ckpt_in: str) -> None:
    """Under PP=2, a user's own pipeline-schedule loop of several micro-batches: the public
    ``estimate_importance`` with the loop and with batches, and the context manager left
    without ``flush()`` (the README's example): the flush is done for the user."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import nemo_minitron as nm
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    init_distributed(ParallelConfig(pipeline_model_parallel_size=2), seed=3)
    model = build_model(nm.ModelConfig(**CFG))
    nm.load_weights(ckpt_in, model)
    model.eval()

    def loop(m: torch.nn.Module) -> None:
        pos = torch.arange(32).unsqueeze(0).expand(2, 32)

        def step(it, mod):
            return mod(next(it), pos, None), lambda o, non_loss_data=False: o.new_zeros(())

        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter(_tokens().split(2)), model=[m],
                num_microbatches=4, seq_length=32, micro_batch_size=2, forward_only=True,
                collect_non_loss_data=True)

    results = {"loop": nm.estimate_importance(model, loop),
               "batches": nm.estimate_importance(model, list(_tokens().split(4)),
                                                 micro_batch_size=2)}
    with nm.ImportanceEstimator(model) as est:
        loop(model)
    results["with"] = est.finalize()
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process' scores (with what the recomputation needs, and its checkpoint), then the
    same weights' scores under TP=2 and PP=2 in one 2-process start-up."""
    d = tmp_path_factory.mktemp("scores")
    spawn(score_job, 1, str(d / "ref.pt"), 1, 1, None, str(d / "ck"))
    spawn(in_order, 2, [(score_job, (str(d / "tp2.pt"), 2, 1, str(d / "ck"), None)),
                        (score_job, (str(d / "pp2.pt"), 1, 2, str(d / "ck"), None)),
                        (user_loop_job, (str(d / "loop.pt"), str(d / "ck")))])
    return d


def test_scores_match_a_torch_recomputation(runs):
    from nemo_minitron.importance.scores import Scores

    scores = Scores.load(runs / "ref.pt")
    ref = torch.load(str(runs / "ref.pt") + ".ref")
    F = CFG["ffn_hidden_size"]
    hidden = torch.zeros(CFG["hidden_size"], dtype=torch.float64)
    for i in range(CFG["num_layers"]):
        x = ref["captured"][f"pre_mlp_layernorm.{i}"].double()  # [s, b, h]
        w = ref["fc1"][i].double()  # [2F, h]: SwiGLU stores [gate; up]
        act = torch.nn.functional.silu(x @ w[:F].T) * (x @ w[F:].T)  # [s, b, F]
        expected = act.abs().mean(0).pow(2).sum(0).sqrt()  # mean over seq, L2 over batch
        torch.testing.assert_close(scores.ffn[i].double(), expected,
                                   rtol=1e-4, atol=1e-6)
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            y = ref["captured"][f"{name}.{i}"].double().abs()
            hidden += y.mean(0).pow(2).sum(0).sqrt()
        # Block importance: 1 - cos(layer input, layer output), averaged over every token.
        a = ref["captured"][f"block_in.{i}"].double()
        b = ref["captured"][f"block_out.{i}"].double()
        cos = (a * b).sum(-1) / (a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt())
        assert a.shape == b.shape == (32, 8, CFG["hidden_size"])
        assert scores.layers[i].item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
        # Cosines are float64 throughout: the one rounding is the float32 of the saved score.
        assert scores.layers[i].item() == pytest.approx((1 - cos).mean().item(), rel=2e-7)
    torch.testing.assert_close(scores.hidden.double(), hidden, rtol=1e-4, atol=1e-6)
    # The per-sequence reduction runs in float32 (no float64 copy of the activations): its
    # rounding stays at float32's resolution.
    torch.testing.assert_close(scores.hidden.double(), hidden, rtol=1e-6, atol=0)
    assert scores.layers.shape == (4,)
    # A query group scores the sum of its heads.
    torch.testing.assert_close(scores.groups,
                               scores.heads.view(4, 4, 2).sum(-1))
    assert scores.meta["num_sequences"] == 8
    # Angular distance between the hidden states entering layers i and j (j = L: the final
    # hidden state before the final norm), averaged over every token.
    L = CFG["num_layers"]
    enter = [ref["captured"][f"enter.{i}"].double() for i in range(L + 1)]  # [s, b, h]
    expected = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    for i in range(L + 1):
        for j in range(L + 1):
            if i != j:
                cos = torch.nn.functional.cosine_similarity(enter[i], enter[j], dim=-1)
                expected[i, j] = (torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean()
    torch.testing.assert_close(scores.angular_distance.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.angular_distance.double(), expected, rtol=2e-7, atol=0)
    assert (expected[~torch.eye(L + 1, dtype=torch.bool)] > 1e-3).all()  # not trivially zero
    from nemo_minitron.importance.layers import block_angular_distance

    for n in range(1, L + 1):
        torch.testing.assert_close(block_angular_distance(scores.angular_distance, n).double(),
                                   torch.stack([expected[i, i + n] for i in range(L - n + 1)]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.dist
def test_scores_identical_under_tp2_and_pp2(runs):
    from nemo_minitron.importance.scores import Scores

    ref = Scores.load(runs / "ref.pt")
    for name in ("tp2", "pp2"):
        got = Scores.load(runs / f"{name}.pt")
        for axis in (*Scores.AXES, "angular_distance"):
            torch.testing.assert_close(getattr(got, axis), getattr(ref, axis), rtol=1e-5,
                                       atol=1e-6, msg=f"{name} {axis}")


@pytest.mark.dist
def test_users_pp_loop_is_flushed_for_them(runs):
    from nemo_minitron.importance.scores import Scores

    ref = Scores.load(runs / "ref.pt")
    for name, got in torch.load(runs / "loop.pt", weights_only=False).items():
        assert got.meta["num_sequences"] == 8, name
        for axis in (*Scores.AXES, "angular_distance"):
            torch.testing.assert_close(getattr(got, axis), getattr(ref, axis), rtol=1e-5,
                                       atol=1e-6, msg=f"{name} {axis}")
