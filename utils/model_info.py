"""ModelInfo: what every consumer of a trained network needs to know about it, wherever it was read from.

A checkpoint (utils.checkpoint.model_info) and an exported artifact's metadata (`from_metadata`) both become
one of these, so export, quantize, eval, predict and the analysis scripts read the same fields. Torch-free, so
predict.py's ONNX path can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.data.preprocess import Preprocess


@dataclass
class ModelInfo:
    """A network's identity: what it is, what it predicts, and how images must be prepared for it."""

    model_name: str
    classes: list[str] | None
    preprocess: Preprocess | None
    model_kwargs: dict = field(default_factory=dict)  # models.model_kwargs(): rebuilds the same network
    num_classes: int | None = None
    source: str = ""  # where it came from, for messages
    temperature: float = 1.0  # eval.py --calibrate: logits are divided by it before the softmax (probabilities only)

    def __post_init__(self):
        if self.num_classes is None and self.classes is not None:
            self.num_classes = len(self.classes)

    @classmethod
    def from_metadata(cls, meta: dict, default_name: str, source: str = "") -> ModelInfo:
        """From decoded artifact metadata (utils.deploy.metadata.decode_metadata); missing entries stay None."""
        num = meta.get("num_classes")
        return cls(meta.get("model_name", default_name), meta.get("classes"), meta.get("preprocess"),
                   dict(meta.get("model_kwargs") or {}), int(num) if num is not None else None, source,
                   float(meta.get("temperature", 1.0)))


def with_temperature(forward, temperature: float):
    """`forward` (images -> logits, numpy or torch) with its logits divided by a calibrated model's temperature
    (eval.py --calibrate): the probabilities readers compute become calibrated, the ranking of classes stays."""
    if temperature == 1.0:
        return forward

    def scaled(x):
        return forward(x) / temperature

    return scaled
