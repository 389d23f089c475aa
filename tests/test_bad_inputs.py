"""Bad input across the verbs, table-driven: each case exits 2 with exactly one stderr line
``error: ...`` naming the cause, no traceback, and leaves no output behind. Fixtures (corrupt,
truncated, foreign, crafted) are built by ``tests/helpers/bad_inputs.py``; every case runs
``cli.main`` in-process."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.dist import spawn
from tests.helpers.bad_inputs import (
    Ctx,
    _cfg,
    _decilm,
    _dense_scores,
    _hf_tok_dir,
    _hf_tokenizer,
    _model_vocab,
    _model_yaml,
    _moe_model,
    _no_tokenizer,
    _qwen2_moe,
    _run_copy,
    _saved,
    _search_out,
    _tensor,
    _truncate,
    _word_tokenizer,
)
from tests.helpers.train import pretrain_job

RECIPE_TRAIN = ["train.train_iters=1", "train.eval_interval=0"]
CACHE_TRAIN = RECIPE_TRAIN + ["train.micro_batch_size=2", "train.global_batch_size=4"]
# The tiny source (205,120 parameters): L1-H64-F64-A2-G1 is among its candidates.
SEARCH = ["search.target_params=150000", "search.tolerance=0.3"]
HETERO = ["search.mode=heterogeneous", "search.retrain_steps=1"]
NORM = "model.layers.0.input_layernorm.weight"
PROJ = "model.layers.0.mlp.down_proj.weight"

# (id, argv builder, needles); "OUT" in argv is the output path that must not appear.
INSTRUCT = CACHE_TRAIN + ["instruct.data=embedded", "kd.teacher_max_loss_ratio=2"]
ON_POLICY = ["kd.on_policy.fraction=0.5", "kd.on_policy.sampling.max_new_tokens=8"]


def _kd(*extra: str) -> Callable[[Ctx], list[str]]:
    """``distill`` of ``good`` into itself on the embedded instruction set, plus ``extra``."""
    return lambda c: ["distill", "--teacher", str(c.good), "--student", str(c.good), *c.data,
                      *INSTRUCT, *extra, "--out", "OUT"]


CASES: list[tuple[str, Callable[[Ctx], list[str]], list[str]]] = [
    # ---- recipes and overrides (pretrain)
    ("recipe-missing", lambda c: ["pretrain", str(c.tmp / "no.yaml"), "--out", "OUT"],
     ["does not exist"]),
    ("recipe-directory", lambda c: ["pretrain", str(c.tmp), "--out", "OUT"],
     ["is a directory"]),
    ("recipe-non-utf8", lambda c: ["pretrain", c.file("r.yaml", b"model:\n  x: \xff\xfe\n"),
                                   "--out", "OUT"], ["r.yaml", "UTF-8"]),
    ("recipe-binary", lambda c: ["pretrain", c.file("r.yaml", bytes(range(256))), "--out",
                                 "OUT"], ["r.yaml"]),
    ("recipe-not-yaml", lambda c: ["pretrain", c.file("r.yaml", "model: [1, 2\n"), "--out",
                                   "OUT"], ["is not valid YAML"]),
    ("recipe-list", lambda c: ["pretrain", c.file("r.yaml", "- a\n"), "--out", "OUT"],
     ["must be a YAML mapping"]),
    ("unknown-key", lambda c: ["pretrain", *c.tiny, "train.lrr=1", "--out", "OUT"],
     ["train.lrr"]),
    ("lr-string", lambda c: ["pretrain", *c.tiny, "train.lr=fast", "--out", "OUT"],
     ["train.lr"]),
    ("lr-nan", lambda c: ["pretrain", *c.tiny, "train.lr=nan", "--out", "OUT"], ["train.lr"]),
    ("lr-inf", lambda c: ["pretrain", *c.tiny, "train.lr=inf", "--out", "OUT"], ["train.lr"]),
    ("lr-negative", lambda c: ["pretrain", *c.tiny, "train.lr=-1", "--out", "OUT"],
     ["train.lr"]),
    ("split-zero", lambda c: ["pretrain", *c.tiny, "data.split=0,0,0", "--out", "OUT"],
     ["data.split"]),
    ("split-words", lambda c: ["pretrain", *c.tiny, "data.split=a,b,c", "--out", "OUT"],
     ["data.split"]),
    ("split-negative", lambda c: ["pretrain", *c.tiny, "data.split=-1,1,1", "--out", "OUT"],
     ["data.split"]),
    ("heads-zero", lambda c: ["pretrain", *c.tiny, "model.num_attention_heads=0", "--out",
                              "OUT"], ["model.num_attention_heads"]),
    ("layers-zero", lambda c: ["pretrain", *c.tiny, "model.num_layers=0", "--out", "OUT"],
     ["model.num_layers"]),
    ("hidden-negative", lambda c: ["pretrain", *c.tiny, "model.hidden_size=-64", "--out",
                                   "OUT"], ["model.hidden_size"]),
    ("groups-not-dividing", lambda c: ["pretrain", *c.tiny, "model.num_query_groups=3",
                                       "--out", "OUT"], ["model.num_query_groups=3"]),
    ("hetero-shapes-length", lambda c: ["pretrain", *c.tiny, "model.layer_shapes=[{}]",
                                        "--out", "OUT"], ["model.layer_shapes", "1 entries"]),
    ("hetero-size-on-no-op", lambda c: [
        "pretrain", *c.tiny, "model.layer_shapes=[{}, {mlp: no_op, ffn_hidden_size: 64}]",
        "--out", "OUT"], ["model.layer_shapes[1].ffn_hidden_size=64", "no_op"]),
    ("moe-topk-above-experts", lambda c: ["pretrain", *c.tiny, "model.num_moe_experts=2",
                                          "model.moe_router_topk=3", "--out", "OUT"],
     ["model.moe_router_topk=3", "model.num_moe_experts=2"]),
    ("moe-ep-above-data-parallel", lambda c: [
        "pretrain", *c.tiny, "model.num_moe_experts=4", "parallel.expert_model_parallel_size=2",
        "--out", "OUT"], ["parallel.expert_model_parallel_size=2", "data-parallel size 1"]),
    ("batch-not-dividing", lambda c: ["pretrain", *c.tiny, "train.global_batch_size=6",
                                      "--out", "OUT"], ["train.global_batch_size=6"]),
    ("iters-zero", lambda c: ["pretrain", *c.tiny, "train.train_iters=0", "--out", "OUT"],
     ["train.train_iters"]),
    ("pp-not-dividing", lambda c: ["pretrain", *c.tiny,
                                   "parallel.pipeline_model_parallel_size=2", "--out", "OUT"],
     ["does not divide the world size 1"]),
    ("pretrain-out-other-shape", lambda c: ["pretrain", *c.tiny, "model.hidden_size=32",
                                            "--out", _run_copy(c)],
     ["holds a run of another model shape", "hidden_size=64", "hidden_size=32"]),
    ("pretrain-out-other-vocab", lambda c: ["pretrain", *c.tiny, *RECIPE_TRAIN,
                                            "model.make_vocab_size_divisible_by=768",
                                            "--out", _run_copy(c)],
     ["holds a run of another model shape", "vocab_size=1024", "vocab_size=1536"]),
    ("pretrain-out-is-a-file", lambda c: ["pretrain", *c.tiny, "--out", c.file("f", "x")],
     ["--out=", "is a file"]),
    ("finetune-out-is-a-file", lambda c: ["finetune", str(c.good), *c.tiny, "--out",
                                          c.file("f", "x")], ["--out=", "is a file"]),
    ("pretrain-hidden-unallocatable", lambda c: ["pretrain", *c.tiny,
                                                 "model.hidden_size=1000000000000", "--out",
                                                 "OUT"],
     ["the model (", "parameters) needs about", "GiB", "this machine has"]),
    ("pretrain-iters-unallocatable", lambda c: ["pretrain", *c.tiny,
                                                "train.train_iters=1000000000000", "--out",
                                                "OUT"],
     ["train.train_iters=1000000000000", "dataset index", "GiB", "this machine has"]),
    ("distill-iters-unallocatable", lambda c: ["distill", "--teacher", str(c.good),
                                               "--student", str(c.good), *c.tiny,
                                               "train.train_iters=1000000000000", "--out",
                                               "OUT"], ["dataset index", "this machine has"]),
    ("data-path-missing", lambda c: ["pretrain", *c.tiny, f"data.path={c.tmp / 'nope'}",
                                     f"data.tokenizer={c.tokenizer}", "--out", "OUT"],
     ["nope"]),
    ("prune-data-other-tokenizer", lambda c: [
        "prune", c.ckpt(_hf_tokenizer), "OUT", *c.data, f"data.path={c.prefix}",
        "target.num_layers=1"], ["data.path=", "was tokenized by", "tokenizer.model (sentencepiece",
                                 "ck/tokenizer (huggingface"]),
    ("eval-data-other-tokenizer", lambda c: ["eval", c.ckpt(_hf_tokenizer), "--data", c.prefix],
     ["--data=", "tokenizer.model (sentencepiece", "ck/tokenizer (huggingface"]),
    ("distill-data-tokenizer-differs", lambda c: [
        "distill", "--teacher", str(c.good), "--student", str(c.good), *c.tiny,
        f"data.tokenizer={_word_tokenizer(c.tmp / 'words')}", "--out", "OUT"],
     ["data.tokenizer=", "words (huggingface", "not the checkpoint's tokenizer"]),
    # ---- teacher caches
    ("distill-cache-other-teacher", lambda c: [
        "distill", "--teacher", str(c.good), "--student", str(c.good), *c.data, *CACHE_TRAIN,
        f"kd.teacher_cache={c.other_teachers_cache()}", "--out", "OUT"],
     ["was built from teacher 'runs/teacher/checkpoints/step_0000010'",
      "(weights fingerprint [", "not from --teacher", "(fingerprint ["]),
    ("teacher-cache-vocab-below-data", lambda c: [
        "teacher-cache", "--teacher", c.ckpt(_model_vocab(512)), "--top-k", "4", "--out", "OUT",
        *c.data, *CACHE_TRAIN],
     ["token ids up to 999", "outside the vocabulary of the teacher", "(512 tokens)"]),
    # ---- instruction data
    ("sft-every-response-empty", lambda c: [
        "sft", str(c.good), c.file("e.jsonl", '{"instruction": "Say it.", "output": ""}\n' * 4),
        "--out", "OUT"], ["e.jsonl", "every response is empty"]),
    ("distill-instruct-all-too-long", _kd("instruct.embedded_max_chars=300"),
     ["train.jsonl: every example is longer than model.seq_length + 1 = 65 tokens"]),
    ("distill-instruct-with-cache", _kd("kd.teacher_cache=/x"),
     ["kd.teacher_cache", "cannot be used with instruct.data"]),
    ("distill-instruct-valid-fraction", _kd("instruct.valid_fraction=1.5"),
     ["instruct.valid_fraction=1.5", "[0, 1)"]),
    ("distill-instruct-template-missing", _kd("instruct.chat_template=/no/such.jinja"),
     ["instruct.chat_template='/no/such.jinja' does not exist"]),
    ("distill-gjsd-beta", _kd("kd.divergence=gjsd", "kd.beta=1.5"), ["kd.beta=1.5", "[0, 1]"]),
    ("distill-on-policy-fraction", _kd("kd.on_policy.fraction=-0.1"),
     ["kd.on_policy.fraction=-0.1", "[0, 1]"]),
    ("distill-on-policy-no-room", _kd(*ON_POLICY, "kd.on_policy.sampling.max_new_tokens=64"),
     ["kd.on_policy.sampling.max_new_tokens=64", "no room for the prompt"]),
    ("distill-on-policy-packed", _kd(*ON_POLICY, "instruct.pack=true"),
     ["kd.on_policy.fraction > 0 needs instruct.pack=false"]),
    ("distill-on-policy-pp2", _kd(*ON_POLICY, "parallel.pipeline_model_parallel_size=2"),
     ["kd.on_policy.fraction > 0 needs pipeline_model_parallel_size=1"]),
    ("distill-on-policy-no-instructions", _kd(*ON_POLICY, "instruct.data=null"),
     ["kd.on_policy.fraction > 0 needs instruction data"]),
    # ---- the data verb
    ("data-empty-file", lambda c: ["data", c.file("e.jsonl", ""), "--tokenizer", c.tokenizer,
                                   "--output-prefix", "OUT/x"], ["no non-empty document"]),
    ("data-non-utf8-jsonl", lambda c: ["data", c.file("b.jsonl", b'{"text": "\xff\xfe"}\n'),
                                       "--tokenizer", c.tokenizer, "--output-prefix", "OUT/x"],
     ["b.jsonl", "UTF-8"]),
    ("data-binary-text", lambda c: ["data", c.file("b.txt", bytes(range(256)) * 4),
                                    "--tokenizer", c.tokenizer, "--output-prefix", "OUT/x"],
     ["b.txt"]),
    ("data-bad-json-line", lambda c: ["data", c.file("j.jsonl", '{"text": "a"}\n{"text": \n'),
                                      "--tokenizer", c.tokenizer, "--output-prefix", "OUT/x"],
     ["j.jsonl", "2"]),
    ("data-missing-key", lambda c: ["data", c.file("k.jsonl", '{"body": "a"}\n'),
                                    "--tokenizer", c.tokenizer, "--output-prefix", "OUT/x"],
     ["k.jsonl", "text"]),
    ("data-missing-input", lambda c: ["data", str(c.tmp / "none.jsonl"), "--tokenizer",
                                      c.tokenizer, "--output-prefix", "OUT/x"],
     ["none.jsonl"]),
    ("data-tokenizer-garbage", lambda c: ["data", c.file("t.jsonl", '{"text": "a"}\n'),
                                          "--tokenizer", c.file("tok.model", b"\x00garbage"),
                                          "--output-prefix", "OUT/x"], ["tok.model"]),
    ("data-tokenizer-json-garbage", lambda c: [
        "data", c.file("t.jsonl", '{"text": "a"}\n'), "--tokenizer",
        str(_hf_tok_dir(c, b"{not json")), "--output-prefix", "OUT/x"], ["tokenizer.json"]),
    ("data-no-tokenizer", lambda c: ["data", c.file("t.jsonl", '{"text": "a"}\n'),
                                     "--output-prefix", "OUT/x"], ["--tokenizer"]),
    ("data-train-tokenizer-no-text", lambda c: ["data", c.file("w.jsonl", '{"text": " "}\n'),
                                                "--train-tokenizer", "300",
                                                "--output-prefix", "OUT/x"],
     ["--train-tokenizer", "no text"]),
    ("data-train-tokenizer-zero", lambda c: ["data", c.file("t.jsonl", '{"text": "a"}\n'),
                                             "--train-tokenizer", "0", "--output-prefix",
                                             "OUT/x"], ["--train-tokenizer=0", "above 261"]),
    ("data-train-tokenizer-too-small", lambda c: [
        "data", c.file("t.jsonl", '{"text": "hello world"}\n'), "--train-tokenizer", "265",
        "--output-prefix", "OUT/x"], ["--train-tokenizer=265", "at least 269"]),
    # ---- checkpoints given to the verbs
    ("eval-missing-ckpt", lambda c: ["eval", str(c.tmp / "none"), "--data", c.prefix],
     ["does not exist"]),
    ("generate-not-a-ckpt", lambda c: ["generate", str(c.tmp), "--prompt", "a"],
     ["is not a nemo_minitron checkpoint"]),
    ("export-missing-ckpt", lambda c: ["export-hf", str(c.tmp / "none"), "OUT"],
     ["does not exist"]),
    ("bench-missing-ckpt", lambda c: ["bench", str(c.tmp / "none")], ["does not exist"]),
    ("prune-missing-ckpt", lambda c: ["prune", str(c.tmp / "none"), "OUT", *c.data,
                                      "target.num_layers=1"], ["does not exist"]),
    ("distill-missing-teacher", lambda c: ["distill", "--teacher", str(c.tmp / "none"),
                                           "--student", str(c.good), *c.tiny, "--out", "OUT"],
     ["--teacher", "does not exist"]),
    ("finetune-missing-ckpt", lambda c: ["finetune", str(c.tmp / "none"), *c.tiny, "--out",
                                         "OUT"], ["does not exist"]),
    ("search-missing-ckpt", lambda c: ["search", str(c.tmp / "none"), "OUT", *c.data],
     ["does not exist"]),
    ("prune-scores-text", lambda c: ["prune", str(c.good), "OUT", *c.data,
                                     "target.num_layers=1", f"scores={c.file('s.pt', 'hi')}"],
     ["scores=", "s.pt", "is not a scores file"]),
    ("prune-scores-tensor", lambda c: ["prune", str(c.good), "OUT", *c.data,
                                       "target.num_layers=1",
                                       f"scores={c.file('s.pt', _saved(torch.zeros(2)))}"],
     ["s.pt", "is not a scores file", "Tensor"]),
    ("prune-scores-payload", lambda c: ["prune", str(c.good), "OUT", *c.data,
                                        "target.num_layers=1",
                                        f"scores={c.file('s.pt', _saved({'meta': print}))}"],
     ["s.pt", "refusing to unpickle"]),
    ("prune-moe-experts-below-topk", lambda c: ["prune", c.ckpt(_moe_model), "OUT", *c.data,
                                                "target.num_moe_experts=1"],
     ["target.num_moe_experts=1", "model.moe_router_topk=2"]),
    ("prune-moe-experts-not-dividing-ep", lambda c: [
        "prune", c.ckpt(_moe_model), "OUT", *c.data, "target.num_moe_experts=3",
        "parallel.expert_model_parallel_size=2"],
     ["target.num_moe_experts=3", "parallel.expert_model_parallel_size=2"]),
    ("prune-moe-ffn-not-dividing-tp", lambda c: [
        "prune", c.ckpt(_moe_model), "OUT", *c.data, "target.moe_ffn_hidden_size=33",
        "parallel.tensor_model_parallel_size=2"],
     ["target.moe_ffn_hidden_size=33", "parallel.tensor_model_parallel_size=2"]),
    ("prune-moe-dense-scores", lambda c: ["prune", c.ckpt(_moe_model), "OUT", *c.data,
                                          "target.num_moe_experts=2",
                                          f"scores={_dense_scores(c)}"],
     ["no experts scores", "dense model"]),
    ("prune-moe-target-on-dense", lambda c: ["prune", str(c.good), "OUT", *c.data,
                                             "target.num_moe_experts=2"],
     ["target.num_moe_experts=2", "no routed experts"]),
    ("search-state-torn", lambda c: ["search", str(c.good), _search_out(
        c, "candidates.json", '{"candidates": [{"name": "L1'), *c.data, *SEARCH],
     ["candidates.json", "torn"]),
    ("search-state-not-a-state", lambda c: ["search", str(c.good), _search_out(
        c, "candidates.json", '{"x": 1}'), *c.data, *SEARCH],
     ["candidates.json", "no list of named candidates"]),
    ("search-result-torn", lambda c: ["search", str(c.good), _search_out(
        c, "candidates/L1-H64-F64-A2-G1/result.json", '{"name": '), *c.data, *SEARCH],
     ["L1-H64-F64-A2-G1/result.json", "torn"]),
    ("search-budget-unknown", lambda c: ["search", str(c.good), "OUT", *c.data, *SEARCH,
                                         "search.budget=flops"], ["search.budget", "flops"]),
    ("prune-layer-shape-tp", lambda c: [
        "prune", str(c.good), "OUT", *c.data, "parallel.tensor_model_parallel_size=2",
        "target.layer_shapes=[{ffn_hidden_size: 64}, {ffn_hidden_size: 33}]"],
     ["target.layer_shapes[1].ffn_hidden_size=33", "parallel.tensor_model_parallel_size=2"]),
    ("search-hetero-budget-unreachable", lambda c: [
        "search", str(c.good), "OUT", *c.data, *HETERO, "search.target_params=1000"],
     ["search.target_params=1000", "smallest reachable is"]),
    ("search-hetero-library-empty", lambda c: [
        "search", str(c.good), "OUT", *c.data, *HETERO, "search.target_params=150000",
        "search.blocks.ffn_hidden_size_fractions=[]", "search.blocks.mlp_linear=false",
        "search.blocks.mlp_no_op=false"], ["block library of layer 0 is empty", "mlp"]),
    ("lm-eval-missing-ckpt", lambda c: ["lm-eval", str(c.tmp / "none"), "--tasks", "x"],
     ["does not exist"]),
    ("ckpt-config-non-utf8", lambda c: ["eval", c.ckpt(_model_yaml(b"num_layers: \xff\n")),
                                        "--data", c.prefix], ["model_config.yaml"]),
    ("ckpt-config-not-yaml", lambda c: ["generate", c.ckpt(_model_yaml("a: [1\n")),
                                        "--prompt", "a"], ["model_config.yaml"]),
    ("ckpt-config-string-layers", lambda c: ["eval", c.ckpt(_model_yaml(
        "num_layers: two\nhidden_size: 64\n")), "--data", c.prefix], ["num_layers"]),
    ("ckpt-config-zero-heads", lambda c: ["export-hf", c.ckpt(_model_yaml(
        "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 0\n")), "OUT"],
     ["num_attention_heads"]),
    ("ckpt-metadata-payload", lambda c: ["eval", c.ckpt(lambda d: (d / "weights" / ".metadata")
                                                         .write_bytes(pickle.dumps(print))),
                                         "--data", c.prefix], ["refusing to unpickle"]),
    ("ckpt-metadata-truncated", lambda c: ["generate", c.ckpt(_truncate("weights/.metadata")),
                                           "--prompt", "a"], [".metadata", "corrupt"]),
    ("ckpt-tokenizer-garbage", lambda c: ["generate", c.ckpt(
        lambda d: (d / "tokenizer" / "tokenizer.model").write_bytes(b"\x00junk")),
        "--prompt", "a"], ["tokenizer.model"]),
    # ---- a checkpoint without a tokenizer (imported without one): the verbs that need one
    ("no-tokenizer-generate", lambda c: ["generate", c.ckpt(_no_tokenizer), "--prompt", "a"],
     ["has no tokenizer", "tokenizer.json", "/tokenizer/"]),
    ("no-tokenizer-prune", lambda c: ["prune", c.ckpt(_no_tokenizer), "OUT", *c.data,
                                      "target.num_layers=1"], ["has no tokenizer"]),
    ("no-tokenizer-distill", lambda c: ["distill", "--teacher", str(c.good), "--student",
                                        c.ckpt(_no_tokenizer), *c.tiny, "--out", "OUT"],
     ["has no tokenizer"]),
    ("no-tokenizer-eval-files", lambda c: ["eval", c.ckpt(_no_tokenizer),
                                           c.file("t.txt", "some text")], ["has no tokenizer"]),
    # ---- flags
    ("eval-mbs-zero", lambda c: ["eval", str(c.good), "--data", c.prefix,
                                 "--micro-batch-size", "0"], ["--micro-batch-size"]),
    ("eval-seq-zero", lambda c: ["eval", str(c.good), "--data", c.prefix, "--seq-length", "0"],
     ["--seq-length"]),
    ("eval-windows-negative", lambda c: ["eval", str(c.good), "--data", c.prefix,
                                         "--max-windows", "-1"], ["--max-windows"]),
    ("eval-empty-file", lambda c: ["eval", str(c.good), c.file("e.txt", "")],
     ["fewer than one window"]),
    ("eval-non-utf8-file", lambda c: ["eval", str(c.good), c.file("n.txt", b"ab\xff\xfe")],
     ["n.txt", "UTF-8"]),
    ("eval-no-data", lambda c: ["eval", str(c.good)], ["--data"]),
    ("generate-top-p-zero", lambda c: ["generate", str(c.good), "--prompt", "a", "--sample",
                                       "--top-p", "0"], ["--top-p"]),
    ("generate-top-p-big", lambda c: ["generate", str(c.good), "--prompt", "a", "--sample",
                                      "--top-p", "1.5"], ["--top-p"]),
    ("generate-temperature-negative", lambda c: ["generate", str(c.good), "--prompt", "a",
                                                 "--sample", "--temperature", "-1"],
     ["--temperature"]),
    ("generate-temperature-nan", lambda c: ["generate", str(c.good), "--prompt", "a",
                                            "--sample", "--temperature", "nan"],
     ["--temperature"]),
    ("generate-top-k-negative", lambda c: ["generate", str(c.good), "--prompt", "a",
                                           "--top-k", "-1"], ["--top-k"]),
    ("generate-tokens-negative", lambda c: ["generate", str(c.good), "--prompt", "a",
                                            "--max-new-tokens", "-1"], ["--max-new-tokens"]),
    ("bench-batch-zero", lambda c: ["bench", str(c.good), "--batch-size", "0"],
     ["--batch-size"]),
    ("bench-repeats-zero", lambda c: ["bench", str(c.good), "--repeats", "0"], ["--repeats"]),
    ("lm-eval-batch-zero", lambda c: ["lm-eval", str(c.good), "--tasks", "x", "--batch-size",
                                      "0"], ["--batch-size"]),
    ("export-exists", lambda c: ["export-hf", str(c.good), str(c.tmp)], ["already exists"]),
    ("specdec-chat-data", lambda c: ["specdec", "--target", str(c.good), "--draft", str(c.good),
                                     "--data", c.prefix, "--chat"], ["--chat", "--prompts"]),
    # ---- Hugging Face directories (import-hf)
    ("hf-config-not-json", lambda c: ["import-hf", c.hf_dir(
        lambda d: (d / "config.json").write_text("{oops")), "OUT"], ["config.json"]),
    ("hf-config-non-utf8", lambda c: ["import-hf", c.hf_dir(
        lambda d: (d / "config.json").write_bytes(b'{"a": "\xff"}')), "OUT"], ["config.json"]),
    ("hf-config-list", lambda c: ["import-hf", c.hf_dir(
        lambda d: (d / "config.json").write_text("[1, 2]")), "OUT"], ["config.json"]),
    ("hf-moe-ffn-not-dividing-tp", lambda c: [
        "import-hf", _qwen2_moe(c, moe_intermediate_size=33), "OUT",
        "parallel.tensor_model_parallel_size=2"],
     ["model.moe_ffn_hidden_size=33", "parallel.tensor_model_parallel_size=2"]),
    ("hf-hetero-ffn-not-dividing-tp", lambda c: [
        "import-hf", _decilm(c, ffn=33), "OUT", "parallel.tensor_model_parallel_size=2"],
     ["model.layer_shapes[0].ffn_hidden_size=33", "parallel.tensor_model_parallel_size=2"]),
    ("hf-hetero-block-feature", lambda c: ["import-hf", _decilm(c, ffn=32, sparsify=["x"]),
                                           "OUT"],
     ["block_configs[0].attention.sparsify"]),
    ("hf-moe-arch-unsupported", lambda c: ["import-hf", c.hf_dir(_cfg(
        architectures=["DeepseekV3ForCausalLM"])), "OUT"],
     ["DeepseekV3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM"]),
    ("hf-hidden-string", lambda c: ["import-hf", c.hf_dir(_cfg(hidden_size="64")), "OUT"],
     ["hidden_size"]),
    ("hf-heads-zero", lambda c: ["import-hf", c.hf_dir(_cfg(num_attention_heads=0)), "OUT"],
     ["num_attention_heads"]),
    ("hf-kv-heads-zero", lambda c: ["import-hf", c.hf_dir(_cfg(num_key_value_heads=0)), "OUT"],
     ["num_key_value_heads"]),
    ("hf-eps-string", lambda c: ["import-hf", c.hf_dir(_cfg(rms_norm_eps="tiny")), "OUT"],
     ["rms_norm_eps"]),
    ("hf-nan-weight", lambda c: ["import-hf", c.hf_dir(_tensor(
        PROJ, lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))), "OUT"],
     [PROJ, "NaN"]),
    ("hf-inf-weight", lambda c: ["import-hf", c.hf_dir(_tensor(
        NORM, lambda t: t.index_fill(0, torch.tensor([1]), float("inf")))), "OUT"],
     [NORM, "Inf"]),
    ("hf-bool-norm", lambda c: ["import-hf", c.hf_dir(_tensor(NORM, lambda t: t > 0)), "OUT"],
     [NORM, "BOOL"]),
    ("hf-int-projection", lambda c: ["import-hf", c.hf_dir(_tensor(
        PROJ, lambda t: (t * 100).to(torch.int32))), "OUT"], [PROJ, "I32"]),
    ("hf-tokenizer-garbage", lambda c: ["import-hf", c.hf_dir(
        lambda d: (d / "tokenizer.json").write_text("{nope")), "OUT"], ["tokenizer.json"]),
    ("hf-safetensors-truncated", lambda c: ["import-hf", c.hf_dir(
        _truncate("model.safetensors")), "OUT"], ["model.safetensors", "truncated"]),
    # ---- launch
    ("launch-unknown-stage-verb", lambda c: ["launch", c.file("p.yaml", (
        "stages:\n  - name: a\n    verb: pretrian\n")), "--cluster", "local",
        "--dry-run"], ["pretrian"]),
    ("launch-newline-in-override", lambda c: ["launch", c.file("p.yaml", "model:\n  x: 1\n"),
                                              "train.lr=1\nrm -rf /", "--dry-run"],
     ["newline"]),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_overrides) -> Path:
    out = tmp_path_factory.mktemp("good") / "run"
    spawn(pretrain_job, 1, str(out), tiny_overrides + RECIPE_TRAIN)
    return out / "checkpoints" / "step_0000001"


def _cache_job(teacher: str, out: str, overrides: list[str]) -> None:
    from nemo_minitron.config import load_recipe
    from nemo_minitron.distill.cache_build import build_teacher_cache
    from nemo_minitron.distill.stage import DistillRecipe

    build_teacher_cache(teacher, load_recipe(None, overrides, cls=DistillRecipe), out, 4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, good, tiny_overrides) -> Path:
    """A top-4 teacher cache of ``good`` for a one-step distillation."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    data = [o for o in tiny_overrides if o.startswith("data.")]
    spawn(_cache_job, 1, str(good), str(out), data + CACHE_TRAIN)
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    from tests.interop.hfmodels import save_hf_model

    return save_hf_model(tmp_path_factory.mktemp("hf") / "hf", "llama")


def test_at_least_60_cases():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("build, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, good, hf, cache, tiny_overrides, embedded_paths, capsys, build,
                   needles):
    from nemo_minitron.cli import main

    ctx = Ctx(tmp=tmp_path, good=good, hf=hf, tiny=tiny_overrides, prefix=embedded_paths[0],
              tokenizer=embedded_paths[1], cache=cache)
    out = tmp_path / "out"
    argv = [a.replace("OUT", str(out)) for a in build(ctx)]
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    captured = capsys.readouterr()
    errors = [x for x in captured.err.splitlines() if x.startswith("error: ")
              or ": error: " in x]
    assert rc == 2, captured.err[-2000:]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists()
    assert sorted(tmp_path.rglob("*")) == before, "output left behind"
