"""``onlinemix caption``: BLIP candidates, CLIP's choice, the demo captioner, resuming and bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from onlinemix.caption import BlipCaptioner, main as caption
from onlinemix.data import load_splits
from onlinemix.data.demo_world import SPECIES, scored_caption, write_demo_world
from onlinemix.generator.captions import CaptionStore
from onlinemix.generator.clip_filter import clip_image_features, clip_text_features
from tests.helpers import save_tiny_blip, tiny_clip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a tiny BLIP captioner and a tiny CLIP scorer, as a user's local models."""
    root = tmp_path_factory.mktemp("models")
    blip = save_tiny_blip(root / "blip")
    clip, tokenizer = tiny_clip()
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return blip, str(root / "clip")


def rows_of(path):
    with open(path) as f:
        return json.load(f)


def test_clip_picks_the_most_similar_candidate(models):
    captioner = BlipCaptioner.from_pretrained(*models, nucleus=4, beam=3, max_new_tokens=6)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    torch.manual_seed(0)
    candidates = captioner.candidates(images)
    assert len(candidates) == 3 and all(1 <= len(c) <= 7 and all(c) for c in candidates)
    torch.manual_seed(0)
    chosen = captioner(images)
    for image, texts, (text, similarity) in zip(images, candidates, chosen):
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None] / 255
        cosines = clip_text_features(captioner.clip, captioner.tokenizer, texts) @ clip_image_features(
            captioner.clip, pixels)[0]
        assert text == texts[int(cosines.argmax())]
        assert similarity == pytest.approx(float(cosines.max()), abs=1e-6) and -1 <= similarity <= 1


def test_nucleus_sampling_is_pure_top_p(tmp_path):
    """transformers' generation adds top-k 50 to sampling by default; BLIP's nucleus candidates must not be
    cut to the 50 likeliest words. With top-p 1, a random BLIP of 218 words writes far more than 50
    distinct one-word captions of one image."""
    blip = save_tiny_blip(tmp_path / "blip", extra_words=200)
    clip, tokenizer = tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    captioner = BlipCaptioner.from_pretrained(blip, str(tmp_path / "clip"), nucleus=400, beam=0, top_p=1.0,
                                              max_new_tokens=1)
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    distinct = captioner.candidates([image])[0]
    assert len(distinct) > 60, len(distinct)


def test_caption_writes_a_store_every_training_image_is_in(models, data_dir, tmp_path):
    out = tmp_path / "captions.json"
    result = caption(["--data-dir", data_dir, "--captioner", models[0], "--scorer", models[1], "--nucleus", "2",
                      "--beam", "2", "--max-new-tokens", "5", "--batch-size", "5", "--out", str(out)])
    ids = load_splits(data_dir).train.image_ids()
    store = CaptionStore.load(str(out))
    texts, similarities = store.select(ids)
    assert result["images"] == len(ids) == len(store.rows) and all(texts)
    assert np.all(np.abs(similarities) <= 1)
    assert store.info["complete"] and store.info["captioner"] == models[0] and store.info["beam"] == 2


def test_resume_continues_a_stopped_store_and_refuses_other_settings(models, data_dir, tmp_path):
    out = tmp_path / "captions.json"
    args = ["--data-dir", data_dir, "--captioner", models[0], "--scorer", models[1], "--nucleus", "2", "--beam", "1",
            "--max-new-tokens", "4", "--batch-size", "4", "--out", str(out)]
    caption(args)
    whole = rows_of(out)
    stopped = dict(whole, complete=False, rows=whole["rows"][:8])  # as a job stopped after two batches leaves it
    out.write_text(json.dumps(stopped))
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        caption(args)
    with pytest.raises(ValueError, match="made with other settings"):
        caption([*args, "--resume", "--beam", "3"])
    caption([*args, "--resume"])
    resumed = rows_of(out)
    assert resumed["complete"] and resumed["rows"] == whole["rows"], "the same rows: each batch is seeded alone"


def test_the_demo_captioner_describes_each_image_offline(tmp_path):
    root = tmp_path / "demo"
    write_demo_world(str(root), train_per_class=2, val_per_class=1, test_per_class=1)
    out = tmp_path / "captions.json"
    caption(["--dataset", "demo", "--data-dir", str(root), "--captioner", "demo", "--nucleus", "3", "--beam", "0",
             "--out", str(out)])
    train = load_splits(str(root), dataset="demo").train
    texts, similarities = CaptionStore.load(str(out)).select(train.image_ids())
    assert len(texts) == len(train) and np.all((similarities >= 0.2) & (similarities <= 0.4))
    names = {s.name for s in SPECIES}
    for text, group in zip(texts, train.groups):
        assert not any(name in text for name in names), "a description, never a species' name"
        if ", on " in text:
            assert text.endswith(group.split("/")[1]), "the background is the image's own"


def test_scored_caption_rates_the_share_of_attributes_named():
    species = SPECIES[0]
    full, similarity = scored_caption(species, "land", np.random.default_rng(0))
    rng = np.random.default_rng(1)
    scores = [scored_caption(species, "water", rng) for _ in range(200)]
    assert {round(s, 4) for _, s in scores} <= {round(0.2 + 0.2 * k / 6, 4) for k in range(7)}
    longest = max(scores, key=lambda row: len(row[0].replace("a photo of ", "")))
    assert longest[1] == pytest.approx(0.4) and ", on water" in longest[0]
    assert 0.2 <= similarity <= 0.4 and isinstance(full, str)


def test_bad_settings_are_refused_before_any_work(data_dir, tmp_path):
    out = ["--data-dir", data_dir, "--out", str(tmp_path / "c.json")]
    with pytest.raises(ValueError, match="at least one caption per image"):
        caption([*out, "--nucleus", "0", "--beam", "0"])
    with pytest.raises(ValueError, match="--dataset demo"):
        caption([*out, "--captioner", "demo"])
    with pytest.raises(ValueError, match="--top-p must lie in"):
        caption([*out, "--top-p", "0"])
    with pytest.raises(FileNotFoundError, match="start without --resume"):
        caption([*out, "--resume"])
    with pytest.raises(FileNotFoundError, match="Could not load the BLIP captioner"):
        caption([*out, "--captioner", str(tmp_path / "no-blip"), "--local-files-only"])
