"""What to generate: the strategies of the Diff-Mix paper and a seeded planner of requests.

A ``Request`` says which training image to translate (``reference``), its class
(``source``), the class to translate it toward (``target``), the SDEdit strength
and the noise seed, so any sample can be regenerated from its metadata. Pure
code: no processes, no devices. It is one module because a strategy's fields and the
planner's draws change together: each field (inter-class pairing, text-to-image, inverted,
captioned, guidance sets) is read by the planner and nowhere else in this layer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import numpy as np

PAPER_STRENGTHS = (0.5, 0.7, 0.9)


PERSONALISATIONS = ("ti_db", "ti", "db")  # onlinemix finetune --method
# How the closed loop plans (--gen-policy): the paper's uniform draws, or driven by the classifier's confusion.
POLICIES = ("uniform", "confusion", "hard-class")


@dataclass(frozen=True)
class Strategy:
    """How one augmentation strategy pairs classes and prompts the generator.

    Attributes:
        name: The strategy's name (``diffmix``, ``realguidance`` ...); ``ALIASES`` maps the
            paper's spellings (``diff-mix``, ``real-guidance`` ...) to it.
        inter_class: Target class drawn independently of the reference's class;
            otherwise the target is the reference's own class.
        text_to_image: No reference image: text-to-image generation, strength 1.
        prompt: Template with ``{token}`` (learned placeholder), ``{name}`` (class
            name) and ``{metaclass}`` fields.
        methods: The personalisations (``onlinemix finetune --method``) the strategy
            runs on; empty: the un-tuned base model, whatever personalised folder is at hand.
        strengths: Default SDEdit strengths, drawn uniformly.
        filtered: The strategy includes the CLIP filter (Real-Filtering).
        inverted: Conditions come from an ``onlinemix invert`` store (Diffusion Inversion), one
            per training image, instead of prompts: text-to-image from the reference's own,
            perturbed condition.
        guidance: The strategy's default classifier-free guidance scales, drawn per sample;
            empty: the generator's single default (7.5).
        interpolation: Inverted strategies: the default range ``(low, high)`` of the partner's
            weight ``alpha`` when each condition is mixed with another of its class.
        captioned: Prompts come from a caption store (``onlinemix caption``), one caption per
            training image, joined to the class name with weights (SGID,
            ``onlinemix.generator.captions``); each sample's guidance scales with its caption's similarity.
    """

    name: str
    inter_class: bool
    text_to_image: bool
    prompt: str
    methods: tuple[str, ...]
    strengths: tuple[float, ...]
    filtered: bool = False
    inverted: bool = False
    guidance: tuple[float, ...] = ()
    captioned: bool = False
    interpolation: Optional[tuple[float, float]] = None

    @property
    def personalised(self) -> bool:
        """Runs on a personalised generator (learned tokens and/or LoRA) rather than the base model."""
        return bool(self.methods)

    def prompt_for(self, target: int, class_names: Sequence[str], metaclass: str,
                   tokens: Optional[Sequence[str]] = None) -> str:
        """The prompt that asks for class ``target``; ``tokens`` are the learned tokens in
        class order (default ``<class_i>``)."""
        if self.inverted:
            raise ValueError(f"{self.name} is conditioned on learned tensors (an `onlinemix invert` store), "
                             "not on prompts.")
        if self.captioned:
            raise ValueError(f"{self.name} prompts with each image's caption: use "
                             "onlinemix.generator.captions.captioned_prompt.")
        token = tokens[target] if tokens is not None else placeholder_token(target)
        return self.prompt.format(token=token, name=class_names[target], metaclass=metaclass)


# Diffusion Inversion varies the guidance scale for diversity (its code samples at 2.0 by default and pools
# runs at several scales); the demo's inverted conditions regenerate their species best at 2-4.
INVERSION_GUIDANCE = (2.0, 3.0, 4.0)
# Its sampler mixes every condition with another of its class at weight 0.1 (interpolation_strength),
# then adds noise of strength 0.1 (emb_noise).
INVERSION_INTERPOLATION = (0.1, 0.1)


def placeholder_token(class_index: int) -> str:
    """The learned token of a class, ``<class_i>``."""
    return f"<class_{class_index}>"


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("diffmix", True, False, "a photo of a {token} {metaclass}", PERSONALISATIONS, PAPER_STRENGTHS),
        Strategy("diffaug", False, False, "a photo of a {token} {metaclass}", PERSONALISATIONS, PAPER_STRENGTHS),
        Strategy("diffgen", False, True, "a photo of a {token} {metaclass}", PERSONALISATIONS, (1.0,)),
        Strategy("realmix", True, False, "a photo of a {name}", (), PAPER_STRENGTHS),
        Strategy("realaug", False, False, "a photo of a {name}", (), PAPER_STRENGTHS),
        Strategy("realgen", False, True, "a photo of a {name}", (), (1.0,)),
        Strategy("realfilter", False, True, "a photo of a {name}", (), (1.0,), filtered=True),
        Strategy("realguidance", False, False, "a photo of a {name}", (), (0.1,)),
        Strategy("dafusion", False, False, "a photo of a {token}", ("ti",), (0.25, 0.5, 0.75, 1.0)),
        Strategy("diffinversion", False, True, "", (), (1.0,), inverted=True, guidance=INVERSION_GUIDANCE,
                 interpolation=INVERSION_INTERPOLATION),
        # SGID's prompt, "{caption}. A picture of {name}", is built by captions.captioned_prompt.
        Strategy("sgid", False, False, "", (), (0.3,), captioned=True),
    )
}
# The paper's spellings, accepted everywhere a strategy is named.
ALIASES = {"diff-mix": "diffmix", "diff-aug": "diffaug", "diff-gen": "diffgen", "real-mix": "realmix",
           "real-aug": "realaug", "real-gen": "realgen", "real-filtering": "realfilter",
           "real-guidance": "realguidance", "da-fusion": "dafusion",
           "diff-inversion": "diffinversion"}


def strategy_name(name: str) -> str:
    """The one spelling of a strategy (``diffmix``) for it or its alias (``diff-mix``)."""
    name = ALIASES.get(name, name)
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; choose one of {sorted(STRATEGIES)} "
                         f"(or the paper's spellings {sorted(ALIASES)}).")
    return name


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name`` or its alias; a ``ValueError`` lists the known ones."""
    return STRATEGIES[strategy_name(name)]


def closed_loop(policy: str, strength_schedule: Optional[Sequence[float]]) -> bool:
    """Whether the generator follows the classifier: a policy other than the paper's uniform draws, or a
    strength schedule over training progress."""
    return policy != "uniform" or strength_schedule is not None


def check_policy(strategy, policy: str, floor: float, schedule: Optional[Sequence[float]]) -> None:
    """Stop on a planning policy, floor or strength schedule that ``strategy`` (a ``Strategy`` or
    its name) cannot run, with a message that says what to change."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    if policy not in POLICIES:
        raise ValueError(f"Unknown planning policy {policy!r} (--gen-policy); choose one of {', '.join(POLICIES)}.")
    if policy == "confusion" and not strategy.inter_class:
        raise ValueError(f"The confusion policy pairs a target with another class's images; {strategy.name} "
                         "translates each image toward its own class: use hard-class or uniform.")
    if not 0 <= floor <= 1:
        raise ValueError(f"The policy floor (--gen-policy-floor) must lie in [0, 1], got {floor}.")
    if schedule is not None:
        values = [float(v) for v in schedule]
        if len(values) != 2 or not all(0 < v <= 1 for v in values):
            raise ValueError(f"--strength-schedule takes START END, both in (0, 1], got {list(schedule)}.")
        if strategy.text_to_image:
            raise ValueError(f"{strategy.name} generates from text; it has no strength to schedule.")


def check_guidance(scales: Sequence[float]) -> tuple[float, ...]:
    """Guidance scales as a tuple of floats, each >= 1 (1 turns guidance off)."""
    values = tuple(float(v) for v in np.atleast_1d(scales))
    if not values or any(not np.isfinite(v) or v < 1 for v in values):
        raise ValueError(f"Guidance scales must be >= 1 (1 turns guidance off), got {list(values)}.")
    return values


def check_interpolation(strategy, interpolation: Sequence[float]) -> tuple[float, float]:
    """The interpolation range ``(low, high)`` of an inverted strategy, both in [0, 1]."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    if not strategy.inverted:
        raise ValueError(f"Interpolating conditions (--inversion-interpolation) needs an inverted strategy "
                         f"(diffinversion); {strategy.name} has no learned condition per image.")
    values = [float(v) for v in np.atleast_1d(interpolation)]
    if len(values) != 2 or not all(0 <= v <= 1 for v in values) or values[0] > values[1]:
        raise ValueError(f"The partner's interpolation weight alpha is drawn in [LOW, HIGH], 0 <= LOW <= HIGH <= 1 "
                         f"(--inversion-interpolation LOW HIGH), got {values}.")
    return values[0], values[1]


def long_tail_weights(class_counts: Sequence[int]) -> np.ndarray:
    """Target-class weights ∝ 1 / (n_c + 1), the paper's choice for long-tail data."""
    return 1.0 / (np.asarray(class_counts, dtype=np.float64) + 1.0)


@dataclass(frozen=True)
class Request:
    """One sample to generate.

    Attributes:
        reference: Index of the reference image in the training set, -1 for text-to-image.
        source: Class of the reference image (equals ``target`` for text-to-image).
        target: Class named in the prompt.
        strength: SDEdit strength in (0, 1]; 1.0 for text-to-image.
        seed: Seed of the sample's initial noise (and of an inverted condition's perturbation).
        partner: Inverted strategies with interpolation: the second image of the class, whose
            condition is mixed in; -1 for none.
        alpha: The partner's weight in ``(1 - alpha)·c_reference + alpha·c_partner``.
        guidance: The sample's classifier-free guidance scale; None: the generator's default.
    """

    reference: int
    source: int
    target: int
    strength: float
    seed: int
    partner: int = -1
    alpha: float = 0.0
    guidance: Optional[float] = None


class Planner:
    """A seeded, reproducible stream of generation requests.

    By default (the paper) the target class is uniform over classes and the
    strength uniform over the strategy's set. Inter-class strategies draw the
    reference image uniformly over the training images, independently of the
    target, as the official code does for long-tail data: the reference's class is
    the source, so on a long-tail set head classes lend most backgrounds (drawing
    a source class first would let the few images of tail classes supply most of
    them). On a balanced set the two agree. Intra-class strategies draw the
    reference uniformly within the target class.

    Args:
        labels: Class of every training image, in data-set order.
        strategy: A ``Strategy`` or its name.
        num_classes: Number of classes (default ``max(labels) + 1``).
        strengths: Strength set to draw from uniformly, or one fixed strength;
            default the strategy's own.
        referable_classes: If set, each target class may only take references from
            this many source classes, chosen once at random (the paper's Fig. 7b);
            the reference stays uniform over those classes' images.
        target_weights: Relative weight of each target class (e.g.
            ``long_tail_weights(counts)``); default uniform.
        seed: Seed of the whole stream.
        policy: ``uniform`` (the paper's), or a closed-loop policy fed by ``update``:
            ``confusion`` (inter-class strategies) draws the pair (target t, source s) in
            proportion to how often the classifier calls real images of class t "s",
            ``confusion[t, s]``: the sample puts t's foreground on an image of s, the very
            class t is mistaken for, labelled mostly t; the reference is uniform within
            class s. ``hard-class`` draws the target in proportion to the classifier's
            error on it, the source as the strategy says. Target weights multiply both.
        floor: Share of requests drawn by the uniform policy whatever the feedback, so no
            pair starves (and the only policy until the first ``update``).
        strength_schedule: ``(start, end)``: instead of drawing from the strength set, every
            request takes ``start + (end - start)·progress`` (rounded to 0.01), a curriculum
            over training progress from ``update``.
        guidance: Classifier-free guidance scales; with more than one, each request draws its own
            uniformly (one is every request's). None: the generator's default.
        interpolation: Inverted strategies: ``(low, high)``, each request also takes a partner image
            of its class, uniform (itself included, as the method's sampler draws), and the partner's
            weight ``alpha`` uniform in ``[low, high]``; ``(0, 0)`` mixes nothing. None: the
            strategy's default (diffinversion: 0.1).
    """

    def __init__(
        self,
        labels: Sequence[int],
        strategy,
        *,
        num_classes: Optional[int] = None,
        strengths=None,
        referable_classes: Optional[int] = None,
        target_weights: Optional[Sequence[float]] = None,
        seed: int = 0,
        policy: str = "uniform",
        floor: float = 0.2,
        strength_schedule: Optional[Sequence[float]] = None,
        guidance: Optional[Sequence[float]] = None,
        interpolation: Optional[Sequence[float]] = None,
    ):
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        check_policy(self.strategy, policy, floor, strength_schedule)
        self.policy, self.floor = policy, float(floor)
        self.strength_schedule = None if strength_schedule is None else tuple(float(v) for v in strength_schedule)
        self.progress = 0.0
        self._policy_p = None  # the closed-loop policy's distribution, from the latest ``update``
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or (len(labels) and labels.min() < 0):
            raise ValueError("labels must be a flat sequence of non-negative class indices.")
        self.num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
        if len(labels) and labels.max() >= self.num_classes:
            raise ValueError(f"labels hold class {labels.max()} but num_classes={self.num_classes}.")
        self.strengths = self._check_strengths(strengths)
        self.guidance = None if guidance is None else check_guidance(guidance)
        if interpolation is None:
            self.interpolation = self.strategy.interpolation
        else:
            self.interpolation = check_interpolation(self.strategy, interpolation)
        self._rng = np.random.default_rng(seed)
        self._by_class = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
        self._target_p = self._check_weights(target_weights)
        self._sources = self._referable(referable_classes)
        self._labels = labels
        if self._sources is not None:  # each target's candidate references: every image of its source classes
            pools = {}
            for sources in self._sources:
                key = tuple(sources.tolist())
                if key not in pools:
                    pools[key] = np.flatnonzero(np.isin(labels, sources))
            self._references = [pools[tuple(sources.tolist())] for sources in self._sources]

    def scheduled_strengths(self) -> np.ndarray:
        """Every strength a request may take: the schedule's range in 0.01 steps, or the strength set."""
        if self.strength_schedule is None:
            return self.strengths
        low, high = sorted(self.strength_schedule)
        return np.round(np.arange(round(low * 100), round(high * 100) + 1) / 100, 2)

    def update(self, confusion: np.ndarray, progress: float) -> None:
        """Feed the classifier's latest state: ``confusion[t, p]``, the share of class t's real training
        images it calls p (rows of unseen classes all zero), and the share of training done."""
        self.progress = float(progress)
        if self.policy == "uniform":
            return
        confusion = np.asarray(confusion, dtype=np.float64)
        if confusion.shape != (self.num_classes, self.num_classes):
            raise ValueError(f"confusion must be {self.num_classes}x{self.num_classes}, got {confusion.shape}.")
        seen = confusion.sum(1) > 0
        if self.policy == "hard-class":
            error = np.where(seen, 1.0 - np.diag(confusion), 0.0).clip(0, None)
            weights = error * self._target_p
        else:
            weights = confusion * (1 - np.eye(self.num_classes)) * self._target_p[:, None]
            weights *= self._allowed_pairs()
        self._policy_p = weights.ravel() / weights.sum() if weights.sum() > 0 else None

    def _allowed_pairs(self) -> np.ndarray:
        """``[t, s]``: whether target t may take references of class s (images exist, referable)."""
        allowed = np.zeros((self.num_classes, self.num_classes))
        for target, sources in enumerate(self._sources):
            allowed[target, sources] = 1.0
        return allowed

    def policy_state(self) -> dict:
        """What the policy draws now: ``pairs`` (``[target, source]`` probabilities, confusion) or ``targets``
        (hard-class), the floor, and the scheduled strength."""
        state = {"policy": self.policy, "floor": self.floor, "progress": self.progress}
        if self.strength_schedule is not None:
            state["strength"] = self._scheduled()
        if self._policy_p is not None:
            key = "pairs" if self.policy == "confusion" else "targets"
            shape = (self.num_classes, self.num_classes) if key == "pairs" else (self.num_classes,)
            state[key] = np.round(self._policy_p.reshape(shape), 4).tolist()
        return state

    def _scheduled(self) -> float:
        start, end = self.strength_schedule
        return round(start + (end - start) * min(max(self.progress, 0.0), 1.0), 2)

    def _check_strengths(self, strengths) -> np.ndarray:
        if self.strategy.text_to_image:
            if strengths is not None and set(np.atleast_1d(strengths).tolist()) != {1.0}:
                raise ValueError(f"{self.strategy.name} generates from text; its strength is always 1.0.")
            return np.array([1.0])
        values = np.atleast_1d(np.asarray(self.strategy.strengths if strengths is None else strengths, dtype=float))
        if len(values) == 0 or not np.all((values > 0) & (values <= 1)):
            raise ValueError(f"strengths must lie in (0, 1], got {values.tolist()}.")
        return values

    def _check_weights(self, weights) -> np.ndarray:
        has_images = np.array([len(i) > 0 for i in self._by_class])
        if weights is None:
            weights = np.ones(self.num_classes)
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (self.num_classes,) or np.any(weights < 0) or not np.isfinite(weights).all():
            raise ValueError(f"target_weights must be {self.num_classes} non-negative numbers.")
        if not self.strategy.inter_class and (self.strategy.inverted or not self.strategy.text_to_image):
            weights = weights * has_images  # intra-class: the target is also the reference's class
        if weights.sum() <= 0:
            raise ValueError("No target class can be generated: every weight is zero or its class has no images.")
        return weights / weights.sum()

    def _referable(self, k: Optional[int]) -> Optional[list]:
        """For each target class, the source classes it may take references from (None: all)."""
        if not self.strategy.inter_class:
            if k is not None:
                raise ValueError(f"referable_classes (--referable-classes) limits the source classes of inter-class "
                                 f"strategies; {self.strategy.name} translates each image toward its own class.")
            return None
        with_images = np.flatnonzero([len(i) > 0 for i in self._by_class])
        if len(with_images) == 0:
            raise ValueError("No class has training images to translate.")
        if k is None:
            return [with_images] * self.num_classes
        if not 1 <= k <= len(with_images):
            raise ValueError(f"referable_classes (--referable-classes) must be between 1 and {len(with_images)} "
                             f"(classes with images), got {k}.")
        return [np.sort(self._rng.choice(with_images, size=k, replace=False)) for _ in range(self.num_classes)]

    def reseeded(self, seed: int) -> "Planner":
        """A planner with the same classes, weights and referable classes and a fresh stream from ``seed``."""
        planner = copy.copy(self)
        planner._rng = np.random.default_rng(seed)
        return planner

    def take(self, n: int) -> list[Request]:
        """The next ``n`` requests; the stream does not depend on how it is cut into takes."""
        return [self._next() for _ in range(n)]

    def _next(self) -> Request:
        rng = self._rng
        if self._policy_p is not None and rng.random() >= self.floor:
            drawn = int(rng.choice(len(self._policy_p), p=self._policy_p))
            if self.policy == "confusion":  # a (target, source) pair; the reference uniform within the source
                target, source = divmod(drawn, self.num_classes)
                strength, seed = self._strength(), int(rng.integers(0, 2**31 - 1))
                return self._guided(Request(int(rng.choice(self._by_class[source])), source, target, strength, seed))
            return self._request(drawn)  # hard-class: a target
        return self._request(int(rng.choice(self.num_classes, p=self._target_p)))

    def _request(self, target: int) -> Request:
        """The request for ``target``, its reference drawn as the strategy says."""
        rng = self._rng
        strength, seed = self._strength(), int(rng.integers(0, 2**31 - 1))
        if self.strategy.inverted:
            request = Request(int(rng.choice(self._by_class[target])), target, target, 1.0, seed)
            if self.interpolation is not None:
                low, high = self.interpolation
                request = replace(request, partner=int(rng.choice(self._by_class[target])),
                                  alpha=float(rng.uniform(low, high)))
        elif self.strategy.text_to_image:
            request = Request(-1, target, target, 1.0, seed)
        elif self.strategy.inter_class:
            reference = int(rng.choice(self._references[target]))
            request = Request(reference, int(self._labels[reference]), target, strength, seed)
        else:
            request = Request(int(rng.choice(self._by_class[target])), target, target, strength, seed)
        return self._guided(request)

    def _guided(self, request: Request) -> Request:
        if self.guidance is None:
            return request
        scale = self.guidance[0] if len(self.guidance) == 1 else self.guidance[self._rng.integers(len(self.guidance))]
        return replace(request, guidance=float(scale))

    def _strength(self) -> float:
        if self.strength_schedule is not None:
            return self._scheduled()
        return float(self.strengths[self._rng.integers(len(self.strengths))])

    def __iter__(self) -> Iterator[Request]:
        while True:
            yield self._next()
