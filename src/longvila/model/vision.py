"""The vision tower: a Hugging Face SigLIP encoder read at a chosen hidden layer, frames in micro-batches."""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel


class VisionTower(nn.Module):
    """Wraps `SiglipVisionModel`; returns all patch tokens of hidden layer `select_layer`.

    Layers after the selected one are never run (LongVILA reads the second-to-last layer, so the last
    layer and the post-norm would be wasted work); their weights stay so checkpoints round-trip.
    """

    def __init__(self, model: SiglipVisionModel, select_layer: int = -2, micro_batch: int = 64) -> None:
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.micro_batch = micro_batch
        self.gradient_checkpointing = False

    @classmethod
    def from_config(cls, vision: dict, select_layer: int, micro_batch: int) -> VisionTower:
        config = SiglipVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
        return cls(SiglipVisionModel(config), select_layer, micro_batch)

    @property
    def _inner(self) -> nn.Module:
        # transformers >= 5.2x keeps embeddings/encoder on SiglipVisionModel itself; earlier releases
        # nest them under `.vision_model`.
        return getattr(self.model, "vision_model", self.model)

    @property
    def num_layers(self) -> int:
        return len(self._inner.encoder.layers)

    @property
    def layers_to_run(self) -> int:
        """hidden_states[k] is the output of layer k (0 = embeddings), as Hugging Face counts them."""
        index = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        return index

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self._inner
        hidden = vision.embeddings(pixel_values)
        for layer in vision.encoder.layers[: self.layers_to_run]:
            if self.gradient_checkpointing and self.training:
                hidden = torch.utils.checkpoint.checkpoint(layer, hidden, None, use_reentrant=False)
            else:
                hidden = layer(hidden, None)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(F, 3, S, S) normalised frames -> (F, P, C) patch features."""
        if pixel_values.shape[0] == 0:
            patches = self.model.config.image_size // self.model.config.patch_size
            return pixel_values.new_zeros(0, patches * patches, self.model.config.hidden_size)
        dtype = next(self.model.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        chunks = [self._encode(chunk) for chunk in pixel_values.split(self.micro_batch)]
        return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
