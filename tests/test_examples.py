import math

import pytest

from onlinemix.data.toy import write_toy_dataset
from onlinemix.examples import timm_train


@pytest.mark.slow
def test_timm_recipe_example_trains_through_the_prefetcher_path(tmp_path):
    """The example's change to timm's train.py: DiffMixCollate where timm builds FastCollateMixup,
    through timm's own create_loader and PrefetchLoader, fed by a live generator process."""
    write_toy_dataset(str(tmp_path), classes=3, train_per_class=12, val_per_class=1, test_per_class=1)
    result = timm_train.main([
        "--data-dir", str(tmp_path), "--device", "cpu", "--model", "resnet18", "--img-size", "32",
        "--batch-size", "8", "--workers", "0", "--prefetcher", "--cutmix", "1.0", "--diffmix-p", "0.5",
        "--gen-device", "cpu", "--gen-model", "tiny", "--strategy", "realmix", "--gen-steps", "4",
        "--gen-resolution", "32", "--gen-dtype", "float32", "--gen-batch-size", "4", "--ring-slots", "16",
    ])
    assert len(result["losses"]) == 36 // 8 and all(math.isfinite(v) for v in result["losses"])
    stats = result["augmentation"]
    assert stats["samples"] == 32 and stats["replaced"] > 0, "the warmed-up ring supplied synthetic samples"
