import numpy as np
import pytest
import torch

from onlinemix.generator.clip_filter import ClipFilter, clip_image_features, clip_pixels
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


def test_images_are_preprocessed_as_clips_own_image_processor(clip):
    """Short side resized, centre crop, CLIP's mean and std: CLIPImageProcessor's pixels on a 48 x 64 demo
    bird, to within its PIL rounding, and CLIP's embedding of them; a stretched image is far off."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from onlinemix.data.demo_world import SPECIES, render

    image = render(SPECIES[3], "water", np.random.default_rng(0))[0].crop((0, 8, 64, 56))  # 64 wide, 48 high
    model = clip[0]
    size = model.config.vision_config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    expected = processor(images=image, return_tensors="pt").pixel_values
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None] / 255
    ours = clip_pixels(pixels, size)
    assert ours.shape == expected.shape == (1, 3, size, size)
    assert (ours - expected).abs().mean() < 0.02 and (ours - expected).abs().max() < 0.15
    stretched = clip_pixels(torch.nn.functional.interpolate(pixels, size=(64, 64), mode="bilinear"), size)
    assert (stretched - expected).abs().mean() > 5 * (ours - expected).abs().mean()
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=expected)
    reference = reference if isinstance(reference, torch.Tensor) else reference.pooler_output
    cosine = float(clip_image_features(model, pixels)[0] @ torch.nn.functional.normalize(reference.float(), dim=-1)[0])
    assert cosine > 0.999
