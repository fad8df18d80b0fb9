"""onlinemix: Diff-Mix diffusion augmentation generated online, during training."""
from .fidelity import FidelityMonitor
from .labels import mix_labels, one_hot, smooth_labels, translation_label
from .pool import GeneratorPool
from .ring import SampleRing
from .sources import ReplayProducer, ReplaySource, SampleBatch, SampleRecorder, SampleSource, TensorSource
from .transform import DiffMix, DiffMixCollate, RandomResizedCropFlip, SyntheticRows

__all__ = [
    "DiffMix",
    "DiffMixCollate",
    "FidelityMonitor",
    "GeneratorPool",
    "RandomResizedCropFlip",
    "ReplayProducer",
    "ReplaySource",
    "SampleBatch",
    "SampleRecorder",
    "SampleRing",
    "SampleSource",
    "SyntheticRows",
    "TensorSource",
    "mix_labels",
    "one_hot",
    "smooth_labels",
    "translation_label",
]

__version__ = "0.1.0.dev0"
