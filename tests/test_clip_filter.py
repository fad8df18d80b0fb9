import numpy as np
import pytest
import torch

from onlinemix.generator.clip_filter import ClipFilter
from tests.helpers import tiny_clip


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(seed=0)


def test_scores_are_probabilities_and_depend_on_the_image(clip):
    f = ClipFilter(*clip, "bird")
    images = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    scores = f.score(images)
    assert scores.shape == (6,) and torch.all((scores > 0) & (scores < 1))
    assert scores.std() > 0
    torch.testing.assert_close(f.score(images[:2]), scores[:2], rtol=0, atol=1e-5)


def test_drops_the_running_lowest_fraction(clip):
    f = ClipFilter(*clip, "bird", drop_fraction=0.1, window=400, warmup=40)
    g = torch.Generator().manual_seed(1)
    kept_all, scores_all = [], []
    for _ in range(60):
        images = torch.rand(8, 3, 32, 32, generator=g) * torch.rand(8, 1, 1, 1, generator=g)
        scores_all.append(f.score(images))
        kept_all.append(f.keep(images))
    kept, scores = torch.cat(kept_all[10:]), torch.cat(scores_all[10:])  # past the warm-up
    assert abs((~kept).float().mean().item() - 0.1) < 0.05
    assert scores[~kept].max() <= np.quantile(scores.numpy(), 0.25), "the dropped are among the weakest"
    assert all(k.all() for k in kept_all[:4]), "nothing is dropped during the warm-up"
    assert f.kept + f.dropped == 480


def test_clip_filter_errors(clip, tmp_path):
    with pytest.raises(ValueError, match="drop_fraction"):
        ClipFilter(*clip, "bird", drop_fraction=1.0)
    with pytest.raises(FileNotFoundError, match="local"):
        ClipFilter.from_pretrained(str(tmp_path / "no-clip"), "bird", local_files_only=True)


def test_from_pretrained_loads_a_saved_clip(clip, tmp_path):
    model, tokenizer = clip
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = ClipFilter.from_pretrained(tmp_path, "bird", local_files_only=True)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded.score(images), ClipFilter(*clip, "bird").score(images), rtol=0, atol=1e-5)
