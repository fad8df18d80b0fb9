"""The producer a ``GeneratorPool`` worker runs: plan, load references, translate, filter.

``GeneratorSpec`` holds the settings and checks those that need nothing else.
``DiffusionProducerFactory(spec, references, class_names, metaclass)`` is the picklable
factory: the training process builds it (and it checks the settings against the data
set and the personalised folder there, before any process starts); each worker calls
it with its device to load the model once, then calls the returned
``DiffusionProducer`` for batch after batch. It is one module because every generator option
is one ``GeneratorSpec`` field, checked in the factory and read where the producer admits
requests: the three change together.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..plan import Planner, check_guidance, check_policy, closed_loop, get_strategy, strategy_name
from ..batch import SampleBatch
from ..feedback import FeedbackBlock
from .captions import CAPTION_WEIGHTS, CaptionStore, captioned_guidance, captioned_prompt, check_caption_options
from .clip_filter import ClipFilter
from .conditions import ConditionStore, check_inversion_options
from .components import SCHEDULERS, Components, load_components, model_family, sampling_scheduler
from .families import FAMILIES, Family
from .adapters import (accelerator_location, accelerator_schedule, attach_accelerator, attach_personalisation,
                       personalisation_info)
from .sampler import Sampler, Trajectory, check_steps, check_steps_in_strength

logger = logging.getLogger("onlinemix")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class SpecFieldError(ValueError):
    """A ``GeneratorSpec`` field out of range; ``field`` names it, so that a command line can name its flag."""

    def __init__(self, field: str, requirement: str):
        super().__init__(f"{field} {requirement}")
        self.field, self.requirement = field, requirement


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything a generator worker needs to know, picklable.

    Attributes:
        model: Base model, a diffusers folder or hub id (Stable Diffusion 1.5 in the paper).
        finetuned: Folder of the personalised generator (LoRA + learned tokens);
            needed by diffmix, diffaug, diffgen and dafusion (tokens only, ``ti``).
            The real* strategies run the un-tuned base model, as in the paper, and
            ignore it (with a warning).
        strategy: One of ``onlinemix.plan.STRATEGIES`` or its alias (``diff-mix`` for ``diffmix``).
        strengths: Strength set (or one strength); default the strategy's own.
        steps: Denoising steps of the full schedule (25 in the paper).
        guidance: Classifier-free guidance scale (7.5 in the paper), or a tuple of scales each
            sample draws one of; None: the strategy's own set, else 7.5.
        resolution: Generation resolution; references are stretched to it.
        image_size: Size of the images handed to the ring (the training resolution).
        batch_size: Samples per generator batch.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        attention: ``"sdpa"`` or ``"xformers"``.
        clip_model: CLIP folder or hub id for the confidence filter; None: no filter
            (realfilter needs one).
        clip_drop: Share of samples the CLIP filter drops.
        referable_classes: Limit of source classes per target class.
        target_weights: Relative target-class weights (e.g. long-tail).
        local_files_only: Never reach a model hub.
        policy: The planning policy (``onlinemix.plan.POLICIES``): ``uniform`` (the paper's) or a
            closed-loop one fed by the trainer's ``FeedbackBlock``.
        policy_floor: Share of requests the uniform policy draws whatever the feedback.
        strength_schedule: ``(start, end)`` strength over training progress, or None: the strength set.
        continuous: Continuous batching: start a new request as soon as a slot of the batch
            frees, so every U-Net call runs ``batch_size`` samples, and hand each sample over
            when it is done. False: plan a whole batch, run it to the end, hand it over.
        deep_cache: Recompute the U-Net's deep features every ``deep_cache``-th step and reuse
            them in between (DeepCache, an approximation); 1: every step, exact.
        posterior_cache: How many references' VAE posteriors each worker keeps (LRU); a
            reference picked again skips loading and encoding.
        fuse_lora: Fold the personalisation LoRA into the U-Net's weights (the same maps up to
            rounding, without peft's per-layer detour); False keeps the adapter layers.
        channels_last: Keep the U-Net's weights in channels-last memory format (faster
            convolutions on recent GPUs).
        fuse_qkv: Join each attention layer's query, key and value projections into one matrix
            (diffusers' ``fuse_qkv_projections``, after the LoRA is folded in: one GEMM instead of
            three, the same maps up to float rounding). Any family; not with xformers.
        compile: ``torch.compile`` the U-Net in this mode (``COMPILE_MODES``;
            ``"reduce-overhead"`` also captures CUDA graphs); None: eager. Continuous
            batching keeps its input shapes fixed, so it compiles once.
        scheduler: The sampling scheduler (``components.SCHEDULERS``): ``dpm-solver++`` (the
            paper's), or what an acceleration LoRA was distilled for (``lcm-strength`` for an
            ``onlinemix distill`` student: every step inside the strength, on the student's grid).
        accelerator: A few-step acceleration LoRA (``attach_accelerator``: a file, a folder or
            ``org/name/file.safetensors``), loaded next to the personalisation as its own adapter
            and fused with it. Needs its ``scheduler`` and fewer ``steps`` (8 for Hyper-SD's
            CFG-preserving SD 1.5 LoRA, 4 for LCM-LoRA, TCD and an ``onlinemix distill`` student),
            and ``steps · s ≥ 1`` (but for ``lcm-strength``).
        accelerator_weight: The acceleration adapter's weight.
        inversion: The condition store (``onlinemix invert --out``) of an inverted strategy
            (diffinversion), learned on this run's training images at ``resolution``.
        inversion_noise: λ of the Gaussian perturbation ``c + λ·ε`` of every inverted condition.
        inversion_interpolation: ``(low, high)``: mix each condition with another image's of its
            class, ``(1 - α)·c₁ + α·c₂``, the partner's weight ``α`` uniform in the range (before the
            noise); None: the strategy's default (0.1, the method's); ``(0, 0)``: no mixing.
        captions: The caption store (``onlinemix caption --out``, or a user's file) of a captioned
            strategy (sgid), holding every training image of this run.
        caption_weights: ``(caption, label)`` weights of a captioned strategy's prompt.
    """

    model: str
    finetuned: Optional[str] = None
    strategy: str = "diffmix"
    strengths: Optional[tuple] = None
    steps: int = 25
    guidance: Optional[Union[float, tuple]] = None
    resolution: int = 512
    image_size: int = 224
    batch_size: int = 8
    dtype: str = "float32"
    attention: str = "sdpa"
    clip_model: Optional[str] = None
    clip_drop: float = 0.1
    referable_classes: Optional[int] = None
    target_weights: Optional[tuple] = None
    local_files_only: bool = False
    policy: str = "uniform"
    policy_floor: float = 0.2
    strength_schedule: Optional[tuple] = None
    continuous: bool = True
    deep_cache: int = 1
    posterior_cache: int = 1024
    fuse_lora: bool = True
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: Optional[str] = None
    scheduler: str = "dpm-solver++"
    accelerator: Optional[str] = None
    accelerator_weight: float = 1.0
    inversion: Optional[str] = None
    inversion_noise: float = 0.1
    inversion_interpolation: Optional[tuple] = None
    captions: Optional[str] = None
    caption_weights: tuple = CAPTION_WEIGHTS

    @property
    def guidance_scales(self) -> tuple[float, ...]:
        """The guidance scales samples draw from: ``guidance``, else the strategy's, else 7.5."""
        if self.guidance is not None:
            return check_guidance(self.guidance)
        return get_strategy(self.strategy).guidance or (7.5,)

    @property
    def closed_loop(self) -> bool:
        """Whether the planner follows the trainer's feedback (a policy other than uniform, or a schedule)."""
        return closed_loop(self.policy, self.strength_schedule)

    def __post_init__(self):
        """Checks that need no data set, model or process; ``DiffusionProducerFactory`` checks the rest."""
        object.__setattr__(self, "strategy", strategy_name(self.strategy))  # the one spelling, from an alias too
        strategy = get_strategy(self.strategy)
        for field, least, meaning in (("steps", 1, ""), ("batch_size", 1, ""), ("image_size", 1, ""),
                                      ("deep_cache", 1, " (1: no reuse)"), ("posterior_cache", 0, " (0: no cache)")):
            if getattr(self, field) < least:
                raise SpecFieldError(field, f"must be >= {least}{meaning}, got {getattr(self, field)}.")
        if self.guidance is not None:
            check_guidance(self.guidance)
        if self.resolution <= 0 or self.resolution % 8:
            raise SpecFieldError("resolution", f"must be a multiple of 8 above 0 (the VAE's downsampling), got "
                                               f"{self.resolution}.")
        if self.strengths is not None and not all(0 < s <= 1 for s in np.atleast_1d(self.strengths)):
            raise SpecFieldError("strengths", f"are SDEdit strengths in (0, 1], got "
                                              f"{np.atleast_1d(self.strengths).tolist()}.")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}.")
        if self.compile and self.deep_cache > 1:
            raise ValueError("compile and deep_cache > 1 do not mix: DeepCache's shallow calls bypass the compiled "
                             "U-Net; pick one.")
        if self.attention not in ("sdpa", "xformers"):
            raise ValueError(f"attention must be 'sdpa' or 'xformers', got {self.attention!r}.")
        if self.fuse_qkv and (not self.fuse_lora or self.attention == "xformers"):
            raise ValueError("fuse_qkv joins the projections after the LoRA is folded into them, with PyTorch's "
                             "SDPA: keep fuse_lora=True and attention='sdpa', or drop fuse_qkv.")
        if self.attention == "xformers" and importlib.util.find_spec("xformers") is None:
            raise ValueError("attention='xformers' needs the xformers package: pip install 'onlinemix[xformers]', or "
                             "keep PyTorch's SDPA (attention='sdpa', the default).")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}.")
        if self.accelerator and self.scheduler == "dpm-solver++":
            raise ValueError("An acceleration LoRA needs the scheduler it was distilled for: scheduler='ddim-trailing' "
                             "(Hyper-SD), 'lcm' (LCM-LoRA) or 'tcd' (TCD-LoRA), with its step count.")
        if self.accelerator_weight <= 0:
            raise SpecFieldError("accelerator_weight", f"must be > 0, got {self.accelerator_weight}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        check_policy(strategy, self.policy, self.policy_floor, self.strength_schedule)
        check_inversion_options(strategy, self.inversion, self.inversion_noise, self.inversion_interpolation)
        check_caption_options(strategy, self.captions, self.caption_weights)


def warn_coarse_strengths(steps: int, strengths, family: Family = FAMILIES["sd"]) -> None:
    """Warn when few steps make an SDEdit run at a strength far from its label's.

    A strength ``s`` runs the last ``steps - family.first_step(steps, s)`` of ``steps`` steps (diffusers'
    arithmetic: ``int(steps·s)`` on the U-Nets), so it noises to that fraction of the schedule; labels use
    ``s``. At 25 steps the two differ by < 0.04; at 4 (an LCM or TCD adapter) 0.7 runs as 0.5.
    """
    effective = {float(s): (steps - family.first_step(steps, s)) / steps for s in strengths}
    far = {s: e for s, e in effective.items() if abs(s - e) > 0.05}
    if far:
        warnings.warn(f"With {steps} steps, strengths {sorted(far)} noise only to {[far[s] for s in sorted(far)]} "
                      f"(the fraction of the steps they run) while their labels use s; use more steps or strengths "
                      f"that are multiples of 1/{steps}.", stacklevel=3)


def to_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """float ``[B, 3, H, W]`` in ``[0, 1]`` -> uint8 ``[B, 3, size, size]`` (antialiased resize)."""
    if len(images) == 0:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


class DiffusionProducerFactory:
    """A ``GeneratorPool`` factory: ``factory(device)`` loads the generator and returns a ``DiffusionProducer``.

    Built in the training process, where it checks every setting against the data set
    and the personalised folder before any worker starts; pickled to each worker.

    Args:
        spec: The generator settings.
        references: The training images (a split of ``onlinemix.data`` such as
            ``FileSplit``, or anything with ``labels`` and ``load(index) -> uint8 [3, H, W]``).
        class_names: Class names in label order.
        metaclass: What the classes are ("bird" ...), for prompts and the CLIP filter.
        feedback: The trainer's ``FeedbackBlock``; needed when ``spec.closed_loop``.
    """

    def __init__(self, spec: GeneratorSpec, references, class_names: Sequence[str], metaclass: str, *,
                 feedback: Optional[FeedbackBlock] = None):
        if spec.closed_loop and feedback is None:
            raise ValueError(f"The {spec.policy} policy{' with a strength schedule' if spec.strength_schedule else ''} "
                             "follows the trainer: pass feedback=, the trainer's FeedbackBlock.")
        self.spec, self.references, self.feedback = spec, references, feedback
        self.class_names, self.metaclass = list(class_names), metaclass
        self.strategy = get_strategy(spec.strategy)
        # A folder or a cached hub model tells its family now; another hub model once a worker loads it (until
        # then the U-Nets' strength arithmetic is assumed here).
        family = model_family(spec.model) or FAMILIES["sd"]
        check_family_options(family, spec)
        # The files a strategy runs on are the run's to name, so they are asked for here, with the data:
        # the spec alone can be built (and checked) while they are still to be made.
        if self.strategy.personalised and not spec.finetuned:
            raise ValueError(f"{self.strategy.name} needs a personalised generator: pass finetuned= "
                             "(--gen-finetuned), the output folder of `onlinemix finetune`.")
        if self.strategy.filtered and not spec.clip_model:
            raise ValueError(f"{self.strategy.name} is real-gen with the CLIP filter: pass clip_model= "
                             "(--clip-filter), a CLIP folder or hub id (the paper's openai/clip-vit-base-patch32).")
        if len(self.class_names) < 2:
            raise ValueError(f"Need at least 2 classes, got {len(self.class_names)}.")
        if spec.finetuned and not self.strategy.personalised:
            warnings.warn(f"{self.strategy.name} runs the un-tuned base model {spec.model!r}, as in the paper; the "
                          f"personalised generator {spec.finetuned!r} is ignored.", stacklevel=2)
        if self.strategy.personalised:
            self._check_finetuned(spec.finetuned)
        # The planner checks strengths, class weights and the referable-class limit; each worker
        # draws its own stream from it (``reseeded``), the referable classes stay shared.
        self.planner = Planner(references.labels, self.strategy, num_classes=len(self.class_names),
                               strengths=spec.strengths, referable_classes=spec.referable_classes,
                               target_weights=spec.target_weights, policy=spec.policy, floor=spec.policy_floor,
                               strength_schedule=spec.strength_schedule, guidance=spec.guidance_scales,
                               interpolation=spec.inversion_interpolation)
        if self.strategy.inverted:  # a store from another data set or resolution stops here, before any worker
            ConditionStore.check(spec.inversion, references, self.class_names, spec.resolution)
        self.captions = self._captions() if self.strategy.captioned else None
        if spec.scheduler == "lcm-strength":  # every step inside the strength, on the student's grid
            grid = accelerator_schedule(spec.accelerator).get("original_inference_steps", 50) if spec.accelerator \
                else 50
            check_steps_in_strength(spec.steps, self.planner.scheduled_strengths(), grid)
        elif not family.flow:  # a flow schedule runs at least one step of any strength
            check_steps(spec.steps, self.planner.scheduled_strengths())
        if spec.accelerator:
            accelerator_location(spec.accelerator, local_files_only=spec.local_files_only)  # a missing file: now
        if not self.strategy.text_to_image and spec.scheduler != "lcm-strength":
            warn_coarse_strengths(spec.steps, self.planner.scheduled_strengths(), family)

    def _captions(self) -> tuple[list[str], np.ndarray]:
        """Every training image's caption and similarity, in data-set order (a missing one stops here)."""
        if not hasattr(self.references, "image_ids"):
            raise ValueError(f"{self.strategy.name} finds each training image's caption by its id: the references "
                             "need image_ids() (every onlinemix.data split has it).")
        return CaptionStore.load(self.spec.captions).select(self.references.image_ids())

    def _check_finetuned(self, folder: str) -> None:
        strategy = self.strategy
        info = personalisation_info(folder)
        names = info.get("class_names")
        if names is not None and len(names) != len(self.class_names):
            raise ValueError(
                f"The personalised generator in {folder!r} knows {len(names)} classes but the data set has "
                f"{len(self.class_names)}; fine-tune on this data set (same classes, same order)."
            )
        if info["method"] not in strategy.methods:
            raise ValueError(
                f"{strategy.name} needs a generator personalised with {' or '.join(strategy.methods)}, but "
                f"{folder!r} was made with method {info['method']!r}. Make one with `onlinemix finetune "
                f"--method {strategy.methods[0]}` (the same data options, another --out) and pass that folder."
            )
        expected, fingerprint = info.get("training_images"), getattr(self.references, "fingerprint", None)
        if fingerprint is None:
            return
        if expected is None:
            warnings.warn(f"{folder!r} does not record which training images it was fine-tuned on (made by the "
                          "original Diff-Mix code or an older onlinemix); make sure they are this run's.",
                          stacklevel=3)
            return
        actual = fingerprint()
        if actual != expected:
            raise ValueError(
                f"The personalised generator in {folder!r} was fine-tuned on other training images "
                f"({expected['count']} images, sha256 {expected['sha256'][:12]}) than this run trains on "
                f"({actual['count']} images, sha256 {actual['sha256'][:12]}): its tokens would have seen images "
                f"the classifier holds out, or missed ones it trains on. Use the data options it was tuned with "
                f"({info.get('data', 'see its onlinemix.json')}), or fine-tune again on this run's options."
            )

    def __call__(self, device: str) -> "DiffusionProducer":
        spec = self.spec
        return self.producer(load_components(spec.model, dtype=DTYPES[spec.dtype], device=device,
                                             local_files_only=spec.local_files_only, attention=spec.attention))

    def producer(self, components: Components) -> "DiffusionProducer":
        """The producer over loaded base ``components`` (personalised here when the strategy needs it)."""
        spec = self.spec
        tokens = None
        if self.strategy.personalised:
            tokens = attach_personalisation(components, spec.finetuned)["tokens"] or self.class_names
        if spec.accelerator:
            attach_accelerator(components, spec.accelerator, weight=spec.accelerator_weight,
                               local_files_only=spec.local_files_only)
        sampler = build_sampler(components, spec)
        # The pool seeds NumPy per worker and restart, so each worker plans its own stream.
        planner = self.planner.reseeded(int(np.random.randint(0, 2**31 - 1)))
        clip = None
        if spec.clip_model:
            clip = ClipFilter.from_pretrained(spec.clip_model, self.metaclass, device=components.device,
                                              local_files_only=spec.local_files_only, drop_fraction=spec.clip_drop)
        store = ConditionStore.load(spec.inversion) if self.strategy.inverted else None
        return DiffusionProducer(self, sampler, planner, tokens, clip, store)


def check_family_options(family, spec: GeneratorSpec) -> None:
    """Stop on speed options the model's family (``families.Family``) cannot take: the schedulers, acceleration
    LoRAs and DeepCache are the U-Net families' (SD 3 and FLUX sample with their own flow-matching Euler)."""
    if family.flow and spec.scheduler != "dpm-solver++":
        raise ValueError(f"A {family.title} generator samples with its own flow-matching Euler scheduler; "
                         f"scheduler={spec.scheduler!r} is for the U-Net families (Stable Diffusion, SDXL): drop it.")
    if family.flow and spec.resolution % 16:
        raise SpecFieldError("resolution", f"must be a multiple of 16 for a {family.title} generator (the VAE's factor "
                                           f"8 times its transformer's 2x2 patches), got {spec.resolution}.")
    if family.name != "sd" and (spec.accelerator or spec.deep_cache > 1):
        raise ValueError(f"Acceleration LoRAs and DeepCache need a Stable Diffusion 1.x/2.x generator; drop them for "
                         f"the {family.title} one.")


def build_sampler(components: Components, spec: GeneratorSpec) -> Sampler:
    """The sampler of ``spec`` over loaded (and personalised) ``components``, with its speed options applied:
    the scheduler (the U-Net families'; SD 3 and FLUX keep their own), LoRA fusion, fused QKV, memory format,
    compilation."""
    family = components.kind
    check_family_options(family, spec)
    if not family.flow:
        config = components.scheduler.config
        if spec.accelerator and spec.scheduler in ("lcm", "lcm-strength"):  # a distilled student's own grid
            config = {**config, **accelerator_schedule(spec.accelerator)}
        components.scheduler = sampling_scheduler(spec.scheduler, config)
    denoiser = components.denoiser
    if spec.fuse_lora and getattr(denoiser, "peft_config", None):
        # Fold the LoRAs into the weights they adapt: the same maps, without peft's per-layer detour.
        denoiser.fuse_lora()
        denoiser.unload_lora()
    if spec.fuse_qkv:
        denoiser.fuse_qkv_projections()
    if spec.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if spec.compile:
        setattr(components, components.denoiser_name, torch.compile(denoiser, mode=spec.compile))
    return Sampler(components, steps=spec.steps, guidance=spec.guidance_scales[0], deep_cache=spec.deep_cache,
                   posterior_cache=spec.posterior_cache, schedule_in_strength=spec.scheduler == "lcm-strength")


class DiffusionProducer:
    """One worker's producer (``onlinemix.pool.Producer``): ``producer()`` plans, translates and
    filters the next ``SampleBatch``; ``dropped`` counts the samples it made but did not hand over."""

    def __init__(self, factory: DiffusionProducerFactory, sampler: Sampler, planner: Planner, tokens,
                 clip: Optional[ClipFilter], store: Optional[ConditionStore] = None):
        self.factory, self.sampler, self.planner, self.tokens, self.clip = factory, sampler, planner, tokens, clip
        self.store = store
        self.strategy = factory.strategy
        self.non_finite = 0
        self.dropped = 0  # non-finite and CLIP-filtered samples
        self.publication = 0  # the latest feedback the planner follows
        self.in_flight: list[Trajectory] = []

    def follow_feedback(self) -> None:
        """Hand the planner the trainer's latest publication, if it is new."""
        feedback = self.factory.feedback.read()
        if feedback.publication != self.publication:
            self.planner.update(feedback.confusion, feedback.progress)
            self.publication = feedback.publication

    def admit(self) -> None:
        """Plan requests for the free slots and start them (continuous batching), or, without
        ``spec.continuous``, a whole batch once the previous one is done."""
        spec = self.factory.spec
        free = spec.batch_size - sum(len(t) for t in self.in_flight)
        if free == 0 or (self.in_flight and not spec.continuous):
            return
        if spec.closed_loop:
            self.follow_feedback()
        requests = self.planner.take(free)
        self.in_flight += self.start(requests, requests)

    def start(self, requests: Sequence, tags: Sequence) -> list[Trajectory]:
        """Trajectories generating ``requests`` (``onlinemix.plan.Request``), each sample tagged with its tag."""
        spec, f = self.factory.spec, self.factory
        seeds = [r.seed for r in requests]
        guidance = [r.guidance for r in requests]
        if self.strategy.inverted:
            return self.sampler.start_generations(
                self.store.perturbed(requests, spec.inversion_noise), seeds, tags, height=spec.resolution,
                width=spec.resolution, guidance=guidance, unconditional=self.store.mean)
        if self.strategy.captioned:
            captions, similarities = f.captions
            prompts = [captioned_prompt(captions[r.reference], f.class_names[r.target], spec.caption_weights)
                       for r in requests]
            guidance = [float(captioned_guidance(similarities[r.reference], self.sampler.guidance if g is None else g))
                        for r, g in zip(requests, guidance)]
        else:
            prompts = [self.strategy.prompt_for(r.target, f.class_names, f.metaclass, self.tokens) for r in requests]
        if self.strategy.text_to_image:
            return self.sampler.start_generations(prompts, seeds, tags, height=spec.resolution,
                                                  width=spec.resolution, guidance=guidance)
        moments = self.sampler.posteriors([r.reference for r in requests], self.load_references)
        return self.sampler.start_translations(moments, prompts, [r.strength for r in requests], seeds, tags,
                                               guidance=guidance)

    def render(self, requests: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, finite)``: uint8 images of ``requests``, generated together as one batch, in their order,
        and which are finite (no filter). Rendering the same requests on the same software and device kind
        repeats the same bits: a set written offline can be regenerated from its manifest."""
        trajectories = self.start(requests, range(len(requests)))
        while not all(t.done for t in trajectories):
            self.sampler.step(trajectories)
        rows, images = self.sampler.decode(trajectories)
        images = images[torch.argsort(torch.tensor(rows))]
        finite = torch.isfinite(images).flatten(1).all(1)
        return to_uint8(torch.nan_to_num(images), self.factory.spec.image_size), finite

    def load_references(self, indices: Sequence[int]) -> torch.Tensor:
        """Training images ``indices`` stretched to the generation resolution: float ``[n, 3, R, R]`` in [0, 1]."""
        size = (self.factory.spec.resolution,) * 2
        return torch.stack([
            F.interpolate(self.factory.references.load(i)[None].float(), size=size, mode="bilinear",
                          antialias=True)[0] for i in indices
        ]).div_(255).clamp_(0, 1)

    def __call__(self) -> SampleBatch:
        """Fill free slots, step every sample in flight until some finish (all, without continuous batching),
        return those that pass the filters."""
        self.admit()
        ready = any if self.factory.spec.continuous else all
        while not ready(t.done for t in self.in_flight):
            self.sampler.step(self.in_flight)
        finished = [t for t in self.in_flight if t.done]
        self.in_flight = [t for t in self.in_flight if not t.done]
        requests, images = self.sampler.decode(finished)
        keep = torch.isfinite(images).flatten(1).all(1)
        if not keep.all():
            self.non_finite += int((~keep).sum())
            logger.warning("onlinemix generator dropped %d non-finite images (%d so far); with fp16, try bfloat16.",
                           int((~keep).sum()), self.non_finite)
        if self.clip is not None and keep.any():
            keep[keep.clone()] &= self.clip.keep(images[keep])
        rows = torch.nonzero(keep).flatten().tolist()
        self.dropped += len(requests) - len(rows)
        return SampleBatch(
            to_uint8(images[keep], self.factory.spec.image_size),
            torch.tensor([requests[i].source for i in rows], dtype=torch.int64),
            torch.tensor([requests[i].target for i in rows], dtype=torch.int64),
            torch.tensor([requests[i].strength for i in rows], dtype=torch.float32),
        )
