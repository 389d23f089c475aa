"""The memory check of the training verbs (``train.preflight``): its dataset-index size against
the index Megatron's GPT dataset really builds, and no refusal of a run that fits."""

from __future__ import annotations

from nemo_minitron.config import load_recipe
from nemo_minitron.train.preflight import INDEX_BYTES_PER_SAMPLE, check_fits
from tests.helpers.data import TINY_MODEL


def test_index_estimate_covers_megatrons_sample_and_shuffle_index(embedded_paths):
    from nemo_minitron.data.datasets import build_gpt_datasets
    from nemo_minitron.data.tokenizer import load_tokenizer

    prefix, tok = embedded_paths
    splits = build_gpt_datasets(prefix, load_tokenizer(tok), seq_length=64, split="1,0,0",
                                seed=7, num_samples=(40_000, 0, 0))  # several epochs
    ds = splits.train
    built = ds.sample_index.nbytes + ds.shuffle_index.nbytes
    # Megatron narrows both to 32 bits while they fit (half the int64 estimate), never less.
    assert INDEX_BYTES_PER_SAMPLE * len(ds) / 2 <= built <= INDEX_BYTES_PER_SAMPLE * len(ds)
    assert len(ds) >= 40_000


def test_a_run_that_fits_is_not_refused():
    recipe = load_recipe(None, TINY_MODEL + ["train.train_iters=100000"])
    check_fits(recipe, recipe.model)
