import json

import numpy as np
import pytest
from PIL import Image

from onlinemix.data import ImageFolderSplits
from onlinemix.data.demo_world import ENVIRONMENTS, FAMILIES, SPECIES, environments_for, render, write_demo_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_demo_world(str(root), train_per_class=10, val_per_class=2, test_per_class=4)
    return root


def test_renderer_is_deterministic_and_masks_cover_the_bird():
    a, mask_a = render(SPECIES[3], "water", np.random.default_rng(5))
    b, mask_b = render(SPECIES[3], "water", np.random.default_rng(5))
    assert a.size == (64, 64) and a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(mask_a, mask_b) and 0.03 < mask_a.mean() < 0.4
    c, _ = render(SPECIES[3], "water", np.random.default_rng(6))
    assert not np.array_equal(np.asarray(a), np.asarray(c)), "pose, place and background vary with the seed"
    # The bird's own colours sit inside the mask: the wing colour is far commoner there than outside.
    pixels = np.asarray(a).astype(int)
    near_wing = (np.abs(pixels - np.array(SPECIES[3].wing)).sum(-1) < 40)
    assert near_wing[mask_a].mean() > 5 * near_wing[~mask_a].mean()
    with pytest.raises(ValueError, match="environment"):
        render(SPECIES[0], "desert", np.random.default_rng(0))


def test_species_are_fine_grained():
    assert len(SPECIES) == 12 and len({s.name for s in SPECIES}) == 12 and set(FAMILIES) == {s.family for s in SPECIES}
    for family in FAMILIES:
        members = [s for s in SPECIES if s.family == family]
        assert len({s.body for s in members}) == 1, "a family shares its body colour"
        assert {s.home for s in members} == set(ENVIRONMENTS), "each family lives in both environments"
        for s in members:  # every species has a sibling differing in at most two attributes
            differences = [sum(getattr(s, k) != getattr(t, k) for k in ("wing", "head", "tail", "pattern"))
                           for t in members if t is not s]
            assert 1 <= min(differences) <= 2


def test_splits_follow_the_spurious_correlation(world):
    splits = ImageFolderSplits(str(world))
    assert sorted(splits.class_names) == sorted(s.name for s in SPECIES)
    assert list(splits.tests) == ["test", "test_counterfactual"]
    assert np.bincount(splits.train.labels).tolist() == [10] * 12 and len(splits.val) == 24
    home = {s.name: s.home for s in SPECIES}
    family = {s.name: s.family for s in SPECIES}
    in_distribution = round(0.9 * 4) / 4  # 4 test images per class: round(3.6) of them at home
    cases = ((splits.train, 0.9), (splits.tests["test"], in_distribution), (splits.tests["test_counterfactual"], 0.0))
    for split, expected in cases:
        for label in range(12):
            name = splits.class_names[label]
            groups = [g for g, y in zip(split.groups, split.labels) if y == label]
            assert all(g.split("/")[0] == family[name] for g in groups)
            at_home = np.mean([g.split("/")[1] == home[name] for g in groups])
            assert at_home == pytest.approx(expected)
    assert len(set(splits.tests["test_counterfactual"].groups)) == 6, "family × environment"
    info = json.loads((world / "world.json").read_text())
    assert info["metaclass"] == "bird" and len(info["species"]) == 12


def test_world_is_reproducible_and_ships_masks(world, tmp_path):
    write_demo_world(str(tmp_path), train_per_class=10, val_per_class=2, test_per_class=4)
    for path in ("train/amber finch/0003.png", "test_counterfactual/teal wader/0001.png", "train/groups.csv"):
        assert (tmp_path / path).read_bytes() == (world / path).read_bytes(), path
    mask = np.asarray(Image.open(world / "masks" / "train" / "amber finch" / "0003.png"))
    assert mask.shape == (64, 64) and 0 < mask.astype(bool).mean() < 0.5


def test_environments_for_is_exact():
    rng = np.random.default_rng(0)
    chosen = environments_for(10, "land", 0.9, rng)
    assert chosen.count("land") == 9 and chosen.count("water") == 1
    assert environments_for(4, "water", 0.0, rng) == ["land"] * 4


def test_generic_corpus_describes_birds_without_naming_species():
    from onlinemix.data.demo_world import caption, generic_corpus

    corpus = list(generic_corpus(60, seed=1))
    again = list(generic_corpus(3, seed=1))
    assert all(np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1] == b[1] for a, b in zip(corpus, again))
    captions = [c for _, c in corpus]
    # Names may share a colour word with captions (as CUB's do), but never appear whole, nor does a family name.
    assert not any(s.name in c or s.family in c for c in captions for s in SPECIES), "no species identity"
    assert {"on water", "on land"} == {c[c.rindex(" on "):].strip() for c in captions if " on " in c}
    assert any("striped" in c for c in captions) and any("spotted" in c for c in captions)
    # Varied captions: some start "a photo of", some leave attributes out, every one names a bird.
    assert any(c.startswith("a photo of a") for c in captions) and any(" head" not in c for c in captions)
    assert all(" bird" in c for c in captions)
    assert caption(SPECIES[2], "land") == ("a round brown bird with orange wings, a black head and a brown tail, "
                                           "on land")
    assert "an orange head" in caption(SPECIES[2].__class__(**{**SPECIES[2].__dict__, "head": (240, 140, 20)}),
                                       "water")


def test_a_demo_world_of_an_older_layout_is_refused(tmp_path):
    from onlinemix.data.demo_world import check_demo_world

    write_demo_world(str(tmp_path), train_per_class=1, val_per_class=1, test_per_class=1)
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["per_class"] == {"train": 1, "val": 1, "test": 1, "test_counterfactual": 1}
    check_demo_world(str(tmp_path))
    del world["layout"]
    (tmp_path / "world.json").write_text(json.dumps(world))
    with pytest.raises(ValueError, match="layout 1 .*delete the folder"):
        check_demo_world(str(tmp_path))
