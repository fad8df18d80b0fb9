import numpy as np
import pytest

from onlinemix.plan import ALIASES, STRATEGIES, Planner, get_strategy, long_tail_weights, placeholder_token, strategy_name

CLASSES = ["Laysan Albatross", "Sooty Albatross", "Rhinoceros Auklet", "Gray Catbird"]


def test_every_strategy_prompts_as_in_the_paper():
    prompts = {name: s.prompt_for(2, CLASSES, "bird") for name, s in STRATEGIES.items()
               if not (s.inverted or s.captioned)}
    assert prompts == {
        "diffmix": "a photo of a <class_2> bird",
        "diffaug": "a photo of a <class_2> bird",
        "diffgen": "a photo of a <class_2> bird",
        "realmix": "a photo of a Rhinoceros Auklet",
        "realaug": "a photo of a Rhinoceros Auklet",
        "realgen": "a photo of a Rhinoceros Auklet",
        "realfilter": "a photo of a Rhinoceros Auklet",
        "realguidance": "a photo of a Rhinoceros Auklet",
        "dafusion": "a photo of a <class_2>",
    }
    assert get_strategy("realguidance").strengths == (0.1,)
    assert get_strategy("dafusion").strengths == (0.25, 0.5, 0.75, 1.0)
    assert get_strategy("diffmix").strengths == (0.5, 0.7, 0.9)
    assert [n for n, s in STRATEGIES.items() if s.inter_class] == ["diffmix", "realmix"]
    assert {n for n, s in STRATEGIES.items() if s.personalised} == {"diffmix", "diffaug", "diffgen", "dafusion"}
    assert get_strategy("dafusion").methods == ("ti",), "tokens only"
    assert [n for n, s in STRATEGIES.items() if s.filtered] == ["realfilter"]
    assert placeholder_token(11) == "<class_11>"
    assert [n for n, s in STRATEGIES.items() if s.inverted] == ["diffinversion"]
    assert [n for n, s in STRATEGIES.items() if s.captioned] == ["sgid"] and get_strategy("sgid").strengths == (0.3,)
    with pytest.raises(ValueError, match="conditioned on learned tensors"):
        get_strategy("diffinversion").prompt_for(2, CLASSES, "bird")


def test_the_papers_spellings_name_the_same_strategies():
    for alias, name in ALIASES.items():
        assert strategy_name(alias) == name and get_strategy(alias) is STRATEGIES[name]
    spelled_as_named = {"sgid"}  # SGID's papers spell it as its name
    assert set(ALIASES.values()) == set(STRATEGIES) - spelled_as_named, "every other strategy has its paper spelling"
    y = labels()
    assert Planner(y, "diff-mix", seed=1).take(5) == Planner(y, "diffmix", seed=1).take(5)
    with pytest.raises(ValueError, match="Unknown strategy 'diffmix2'"):
        strategy_name("diffmix2")


def labels(per_class=(5, 5, 5, 5)):
    return np.repeat(np.arange(len(per_class)), per_class)


def test_diff_mix_targets_are_uniform_and_references_uniform_over_images():
    y = labels((3, 4, 5, 6, 7))
    requests = Planner(y, "diffmix", seed=1).take(25000)
    pairs = np.zeros((5, 5))
    for r in requests:
        assert y[r.reference] == r.source
        assert r.strength in (0.5, 0.7, 0.9)
        pairs[r.source, r.target] += 1
    expected = 25000 * np.outer(np.bincount(y) / len(y), np.full(5, 1 / 5))  # source ∝ images, target uniform
    assert np.abs(pairs - expected).max() < 5 * np.sqrt(expected.max())  # and independent
    refs = np.bincount([r.reference for r in requests], minlength=len(y))
    assert refs.min() > 0.8 * refs.mean(), "every image is a reference equally often"


def cub_lt_counts(rho=100):
    """CUB-LT's class sizes (the official construction on CUB's 5 994 training images)."""
    k = np.arange(200)
    return np.maximum((5994 / 200 * (1 / rho) ** (k / 198)).astype(int), 1)


def test_long_tail_references_follow_the_images_not_the_classes():
    counts = cub_lt_counts()
    y = labels(counts)
    assert len(y) == 1242
    tail = counts < 5  # CUB-LT's few-shot classes: 123 of 200 classes, 195 of 1242 images
    requests = Planner(y, "diffmix", target_weights=long_tail_weights(counts), seed=0).take(20000)
    share = np.mean([tail[r.source] for r in requests])
    expected = counts[tail].sum() / counts.sum()
    assert abs(share - expected) < 0.01, f"tail classes supply {share:.3f} of references, their images {expected:.3f}"
    targets = np.bincount([r.target for r in requests], minlength=200) / len(requests)
    weights = long_tail_weights(counts)
    np.testing.assert_allclose(targets[tail].sum(), weights[tail].sum() / weights.sum(), atol=0.015)


@pytest.mark.parametrize("name", ["diffaug", "realaug", "realguidance", "dafusion"])
def test_intra_class_strategies_keep_the_class(name):
    requests = Planner(labels(), name, seed=0).take(500)
    assert all(r.source == r.target for r in requests)
    assert {r.strength for r in requests} == set(get_strategy(name).strengths)


@pytest.mark.parametrize("name", ["diffgen", "realgen", "realfilter"])
def test_text_to_image_has_no_reference(name):
    requests = Planner(labels(), name, seed=0).take(100)
    assert all(r.reference == -1 and r.source == r.target and r.strength == 1.0 for r in requests)


def test_referable_class_limit():
    y = labels((4,) * 10)
    planner = Planner(y, "diffmix", referable_classes=3, seed=2)
    requests = planner.take(5000)
    for target in range(10):
        sources = {r.source for r in requests if r.target == target}
        assert len(sources) == 3
        assert sources == set(planner._sources[target].tolist())
    # the reference stays uniform over the referable classes' images
    y = labels((2, 8, 2, 8))
    requests = Planner(y, "diffmix", referable_classes=2, seed=4).take(8000)
    by_target = {t: [r for r in requests if r.target == t] for t in range(4)}
    planner = Planner(y, "diffmix", referable_classes=2, seed=4)
    for target, rs in by_target.items():
        allowed = planner._sources[target]
        share = np.bincount([r.source for r in rs], minlength=4)[allowed] / len(rs)
        sizes = np.bincount(y)[allowed]
        np.testing.assert_allclose(share, sizes / sizes.sum(), atol=0.06)


def test_weighted_targets_follow_long_tail_weights():
    counts = [40, 10, 2, 1]
    weights = long_tail_weights(counts)
    np.testing.assert_allclose(weights, [1 / 41, 1 / 11, 1 / 3, 1 / 2])
    requests = Planner(labels(counts), "diffmix", target_weights=weights, seed=3).take(20000)
    freq = np.bincount([r.target for r in requests], minlength=4) / 20000
    np.testing.assert_allclose(freq, weights / weights.sum(), atol=0.015)


def test_fixed_strength_and_reproducibility():
    a = Planner(labels(), "diffmix", strengths=0.7, seed=5)
    b = Planner(labels(), "diffmix", strengths=0.7, seed=5)
    first = a.take(7) + a.take(13)
    assert first == b.take(20), "the stream does not depend on how it is cut"
    assert {r.strength for r in first} == {0.7}
    assert len({r.seed for r in first}) == 20
    assert Planner(labels(), "diffmix", seed=6).take(20) != first
    it = iter(Planner(labels(), "diffmix", strengths=0.7, seed=5))
    assert [next(it) for _ in range(20)] == first


def test_classes_without_images_are_never_references():
    y = np.array([0, 0, 2, 2])  # class 1 has no image
    requests = Planner(y, "diffmix", num_classes=3, seed=0).take(300)
    assert all(r.source != 1 for r in requests)
    assert any(r.target == 1 for r in requests), "it can still be a target"
    assert all(r.target != 1 for r in Planner(y, "diffaug", num_classes=3).take(300))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="diffmixx"), "Unknown strategy"),
        (dict(strategy="diffmix", strengths=[0.5, 1.2]), r"\(0, 1\]"),
        (dict(strategy="diffmix", strengths=0.0), r"\(0, 1\]"),
        (dict(strategy="diffgen", strengths=0.5), "always 1.0"),
        (dict(strategy="diffmix", referable_classes=9), "referable_classes"),
        (dict(strategy="diffaug", referable_classes=2), "inter-class strategies"),
        (dict(strategy="diffmix", target_weights=[1, 1]), "target_weights"),
        (dict(strategy="diffmix", target_weights=[0, 0, 0, 0]), "every weight is zero"),
        (dict(strategy="diffmix", num_classes=2), "num_classes=2"),
    ],
)
def test_planner_errors(kwargs, message):
    strategy = kwargs.pop("strategy")
    with pytest.raises(ValueError, match=message):
        Planner(labels(), strategy, **kwargs)
