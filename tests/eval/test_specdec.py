"""Speculative decoding against independent references: the target's own greedy ``generate``
(token for token, pruned draft and draft == target; also under TP=2, the same tokens on both
ranks), transformers' assisted generation on the exported models (same tokens, same
proposed/accepted counts at every step), the target's softmax (one-step speculative samples,
chi-square), a from-scratch forward without a KV cache (rollback), and the bad-input errors of
the verb."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.interop.hfmodels import WORDS, save_hf_model, save_tokenizer

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
NEW = 12
TRIALS = 3000
CHI2_999 = {5: 20.52, 7: 24.32}  # 99.9% quantiles of chi-square with 5 and 7 dof


def _prune(ck: Path, out: Path) -> None:
    """The library's magnitude pruning of ``ck``: FFN 128 -> 96, 4 -> 2 query heads."""
    from nemo_minitron.checkpoint.io import (
        load_checkpoint_tokenizer,
        load_model_config,
        load_weights,
        save_checkpoint,
    )
    from nemo_minitron.importance.baselines import magnitude_scores
    from nemo_minitron.model.build import build_model
    from nemo_minitron.model.full_state import gather_full_state_dict
    from nemo_minitron.prune.apply import prune_model
    from nemo_minitron.prune.plan import Target, make_plan

    cfg = load_model_config(ck)
    model = build_model(cfg)
    load_weights(ck, model)
    plan = make_plan(cfg, magnitude_scores(gather_full_state_dict(model), cfg),
                     Target(ffn_hidden_size=96, num_attention_heads=2, hardware_multiple=1))
    save_checkpoint(out, prune_model(model, plan), model_cfg=plan.config,
                    tokenizer=load_checkpoint_tokenizer(ck))


def _rollback_error(target, draft) -> float:
    """Verify K=4 greedy draft tokens in one cached forward, roll back past the first
    rejection, feed the correction and two more tokens: the largest difference of those
    logits from a from-scratch forward (no cache) of the same prefix."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from nemo_minitron.eval.generate import SamplingConfig, generate
    from nemo_minitron.eval.specdec import forward_all

    prompt = PROMPTS[0]
    props = generate(draft, [prompt], SamplingConfig(max_new_tokens=4))[0]
    ctx = StaticInferenceContext(1, 32)
    logits = forward_all(target, torch.tensor([prompt + props]), 0, ctx)
    choice = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    j = next((i for i, (a, b) in enumerate(zip(props, choice)) if a != b), 2)
    assert j < 4
    accepted = prompt + props[:j]
    nxt = [choice[j], 20, 21]  # the correction, then two more tokens in one forward
    got = forward_all(target, torch.tensor([nxt]), len(accepted), ctx)[0]
    full = torch.tensor([accepted + nxt])
    pos = torch.arange(full.shape[1]).unsqueeze(0)
    with torch.no_grad():
        ref = target(full, pos, None, runtime_gather_output=True)[0, len(accepted):].float()
    return float((got - ref).abs().max())


def specdec_job(root: str) -> None:
    import dataclasses

    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.eval.generate import SamplingConfig, generate
    from nemo_minitron.eval.specdec import SpecStats, probs, speculative_generate
    from nemo_minitron.interop.hf_export import export_hf
    from nemo_minitron.interop.hf_import import import_hf
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    r = Path(root)
    import_hf(r / "hf", r / "target")
    import_hf(r / "hf_other", r / "other")
    init_distributed(ParallelConfig())
    _prune(r / "target", r / "draft")
    export_hf(r / "target", r / "hf_target")
    export_hf(r / "draft", r / "hf_draft")
    models = {}
    for name in ("target", "draft"):
        models[name] = build_model(load_model_config(r / name))
        load_weights(r / name, models[name])
        models[name].eval()
    t, d = models["target"], models["draft"]
    greedy = SamplingConfig(max_new_tokens=NEW)
    out: dict = {"ref": generate(t, PROMPTS, greedy), "spec": {}, "single": []}
    for k in (1, 4):
        for name in ("draft", "target"):
            st = SpecStats()
            got = speculative_generate(t, models[name], PROMPTS, greedy, k, stats=st)
            out["spec"][f"{name}-{k}"] = {"out": got, **st.figures()}
    # A stop token the target emits mid-row (it may be accepted inside a run of draft tokens).
    stop = dataclasses.replace(greedy, stop_tokens=[out["ref"][0][NEW // 2]])
    out["stop"] = {"ref": generate(t, PROMPTS, stop),
                   "spec": speculative_generate(t, d, PROMPTS, stop, 4)}
    st = SpecStats()
    for p in PROMPTS:  # batch 1, as transformers' assisted generation runs
        seen = len(st.history)
        got = speculative_generate(t, d, [p], greedy, 4, stats=st)[0]
        out["single"].append({"out": got, "steps": [h[1:] for h in st.history[seen:]]})
    out["single_figures"] = st.figures()
    out["rollback_error"] = _rollback_error(t, d)
    # One-step speculative samples (K=1: the first generated token) of TRIALS copies of a
    # prompt, against the target's filtered softmax after that prompt.
    s = SamplingConfig(max_new_tokens=2, greedy=False, temperature=1.5, top_k=8, seed=5)
    prompt = PROMPTS[2]
    st = SpecStats()
    first = [row[0] for row in speculative_generate(t, d, [prompt] * TRIALS, s, 1,
                                                    vocab_limit=WORDS, stats=st)]
    x = torch.tensor([prompt])
    pos = torch.arange(len(prompt)).unsqueeze(0)
    dists = {}
    with torch.no_grad():
        for name, m in models.items():
            logits = m(x, pos, None, runtime_gather_output=True)[:, -1].float()
            logits[:, WORDS:] = float("-inf")
            dists[name] = probs(logits, s)[0].tolist()
    out["sampling"] = {"first": first, "p": dists["target"], "q": dists["draft"],
                       "acceptance_rate": st.figures()["acceptance_rate"]}
    (r / "out.json").write_text(json.dumps(out))


def specdec_tp2_job(root: str) -> None:
    """Greedy speculative decoding under TP=2 (vocab-parallel logits gathered per step), on the
    checkpoints ``specdec_job`` made at TP=1 (loaded resharded); each rank writes its tokens."""
    import torch.distributed as dist

    from nemo_minitron.checkpoint.io import load_model_config, load_weights
    from nemo_minitron.config import ParallelConfig
    from nemo_minitron.eval.generate import SamplingConfig, generate
    from nemo_minitron.eval.specdec import SpecStats, speculative_generate
    from nemo_minitron.model.build import build_model
    from nemo_minitron.parallel.runtime import init_distributed

    r = Path(root)
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    models = {}
    for name in ("target", "draft"):
        models[name] = build_model(load_model_config(r / name))
        load_weights(r / name, models[name])
        models[name].eval()
    t = models["target"]
    greedy = SamplingConfig(max_new_tokens=NEW)
    stats = {name: SpecStats() for name in models}
    out = {"ref": generate(t, PROMPTS, greedy),
           **{name: speculative_generate(t, m, PROMPTS, greedy, 4, stats=stats[name])
              for name, m in models.items()}}
    out["rates"] = {name: st.figures()["acceptance_rate"] for name, st in stats.items()}
    (r / f"tp2_rank{dist.get_rank()}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("specdec")
    save_hf_model(root / "hf", "llama", seed=7)
    save_hf_model(root / "hf_other", "llama", seed=7, tokenizer=False)
    save_tokenizer(root / "hf_other", words=WORDS - 20)
    spawn(specdec_job, 1, str(root))
    return root, json.loads((root / "out.json").read_text())


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("draft", ["draft", "target"])
def test_greedy_equals_target_generate(result, draft, k):
    _, out = result
    spec = out["spec"][f"{draft}-{k}"]
    assert spec["out"] == out["ref"]
    assert all(len(row) == NEW for row in spec["out"])
    assert spec["proposed"] > 0
    if draft == "target":
        assert spec["acceptance_rate"] == 1.0
        assert spec["acceptance_by_position"] == [1.0] * k
    else:  # the pruned draft is neither always right nor always wrong here
        assert 0.0 < spec["acceptance_rate"] < 1.0


@pytest.mark.dist
def test_greedy_at_tp2_equals_target_generate(result):
    """Under TP=2 both ranks produce the same tokens, and they are the TP=2 target's own greedy
    generation, with the pruned draft and with the target as its own draft (acceptance 1)."""
    root, _ = result
    spawn(specdec_tp2_job, 2, str(root))
    r0, r1 = (json.loads((root / f"tp2_rank{i}.json").read_text()) for i in range(2))
    assert r0 == r1
    assert r0["draft"] == r0["ref"] and r0["target"] == r0["ref"]
    assert all(len(row) == NEW for row in r0["ref"])
    assert r0["rates"]["target"] == 1.0 and 0.0 < r0["rates"]["draft"] < 1.0


def test_stop_token_ends_rows_as_generate_does(result):
    _, out = result
    assert out["stop"]["spec"] == out["stop"]["ref"]
    assert len(out["stop"]["ref"][0]) <= NEW // 2 + 1


def test_same_tokens_and_acceptance_as_transformers_assisted_generation(result):
    from transformers import AutoModelForCausalLM
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    root, out = result
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    target = AutoModelForCausalLM.from_pretrained(str(root / "hf_target"), **kw)
    draft = AutoModelForCausalLM.from_pretrained(str(root / "hf_draft"), **kw)
    draft.generation_config.num_assistant_tokens = 4
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    steps: list[tuple[int, int]] = []
    original = AssistedCandidateGenerator.update_candidate_strategy

    def record(self, input_ids, scores, num_matches):
        steps.append((scores.shape[1] - 1, int(num_matches)))
        return original(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.update_candidate_strategy = record
    drafts: list[tuple[int, int]] = []
    try:
        for prompt, ours in zip(PROMPTS, out["single"]):
            steps.clear()
            with torch.no_grad():
                hf = target.generate(torch.tensor([prompt]), assistant_model=draft,
                                     do_sample=False, max_new_tokens=NEW, eos_token_id=None,
                                     pad_token_id=0)
            assert hf[0, len(prompt):].tolist() == ours["out"]
            # Per verification step with draft tokens: (proposed, accepted), in order.
            drafts += [s for s in steps if s[0] > 0]
            assert [list(s) for s in steps if s[0] > 0] == ours["steps"]
    finally:
        AssistedCandidateGenerator.update_candidate_strategy = original
    # The figures, recomputed from transformers' own steps with vLLM's definitions.
    fig = out["single_figures"]
    proposed, accepted = sum(p for p, _ in drafts), sum(a for _, a in drafts)
    assert proposed > 0 and 0 < accepted < proposed
    assert fig["acceptance_rate"] == pytest.approx(accepted / proposed)
    assert fig["mean_acceptance_length"] == pytest.approx(1 + accepted / len(drafts))
    for k, rate in enumerate(fig["acceptance_by_position"]):  # conditional on 1..k accepted
        reached = [a for p, a in drafts if p > k and a >= k]
        assert rate == (pytest.approx(sum(a > k for a in reached) / len(reached))
                        if reached else None)


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the support of ``p`` and its degrees of freedom."""
    keep = p > 0
    expected = counts.sum() * p[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def test_rejection_rule_samples_the_target_distribution():
    """Pure torch: one verification step of K=1 over many trials on fixed logits, with a draft
    far from the target and top-k applied to both."""
    from nemo_minitron.eval.generate import SamplingConfig
    from nemo_minitron.eval.specdec import probs, verify

    s = SamplingConfig(greedy=False, temperature=0.9, top_k=6)
    lp = torch.tensor([2.0, 1.5, 0.3, -0.5, 0.9, -1.0, 0.0, -2.0])
    lq = torch.tensor([-1.0, 0.5, 2.0, 1.0, -0.5, 0.7, 1.2, 0.0])
    p, q = probs(lp[None], s)[0], probs(lq[None], s)[0]
    assert 0.5 * (p - q).abs().sum() > 0.4  # the draft differs a lot from the target
    n = 200_000
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(q, n, replacement=True, generator=g)
    target_logits = lp.expand(n, 2, 8).clone()
    ok, token, new = verify(target_logits, x[:, None], q.expand(n, 1, 8),
                            torch.zeros(n, 2, dtype=torch.bool),
                            torch.ones(n, 1, dtype=torch.bool), s, g)
    assert bool(new.all())
    sample = torch.where(ok == 1, x, token)
    counts = torch.bincount(sample, minlength=8).float()
    assert counts[p == 0].sum() == 0  # nothing outside the target's top-k
    stat, dof = _chi2(counts, p)
    assert stat < CHI2_999[dof]
    raw, _ = _chi2(torch.bincount(x, minlength=8).float(), p)
    assert raw > 100 * CHI2_999[dof]  # the test tells the draft's own samples apart


def test_speculative_sampling_end_to_end_matches_target_softmax(result):
    _, out = result
    s = out["sampling"]
    p, q = torch.tensor(s["p"]), torch.tensor(s["q"])
    assert 0.5 * (p - q).abs().sum() > 0.05  # a different draft
    assert 0.0 < s["acceptance_rate"] < 1.0
    counts = torch.bincount(torch.tensor(s["first"]), minlength=len(p)).float()
    assert counts[p == 0].sum() == 0
    tv = 0.5 * (counts / TRIALS - p).abs().sum()
    assert tv < 0.05  # E[TV] for 3000 draws over 8 tokens is about 0.02
    stat, dof = _chi2(counts, p)
    assert stat < CHI2_999[dof]


def test_kv_rollback_matches_from_scratch_forward(result):
    _, out = result
    assert out["rollback_error"] < 1e-5


def test_predicted_speedup_formula():
    from nemo_minitron.eval.specdec import predicted_speedup

    for alpha, k, c in ((0.6, 4, 0.2), (0.9, 1, 0.5), (0.0, 8, 0.1)):
        expected_tokens = sum(alpha ** i for i in range(k + 1))
        assert predicted_speedup(alpha, k, c) == pytest.approx(expected_tokens / (k * c + 1))
    assert predicted_speedup(1.0, 4, 0.25) == pytest.approx(5 / 2)


def _cli(*args: str) -> tuple[int, str]:
    from nemo_minitron.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["specdec", *args])
    return rc, err.getvalue().strip()


def test_bad_input_one_line_errors(result, tmp_path):
    root, _ = result
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2 w3\n")
    long = tmp_path / "long.txt"
    long.write_text(" ".join(f"w{i}" for i in range(70)) + "\n")
    t, d, other = (str(root / n) for n in ("target", "draft", "other"))
    cases = [
        (["--target", t, "--draft", other, "--prompts", str(prompts)],
         ["different tokenizers", t, other]),
        (["--target", t, "--draft", d, "--prompts", str(long)],
         ["prompt 0", "model.seq_length=64"]),
        (["--target", t, "--draft", d, "--prompts", str(prompts), "--draft-tokens", "0"],
         ["draft_tokens", "at least 1"]),
        (["--target", t, "--draft", d, "--prompts", str(prompts),
          "parallel.pipeline_model_parallel_size=2"],
         ["pipeline_model_parallel_size=2"]),
        (["--target", t, "--draft", str(tmp_path / "none"), "--prompts", str(prompts)],
         ["draft=", "does not exist"]),
    ]
    for args, needles in cases:
        rc, err = _cli(*args)
        assert rc == 2, err
        assert err.startswith("error: ") and "\n" not in err, err
        for needle in needles:
            assert needle in err, err
