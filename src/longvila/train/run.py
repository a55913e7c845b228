"""Run one stage: pick its trainer. Stage 6 (reinforcement learning) has its own loop, a subclass of the SFT
trainer, so the dispatch lives here, above both, rather than in `trainer.py` (which `rl/trainer.py` imports).
"""

from __future__ import annotations

from longvila.train.recipe import Recipe
from longvila.train.rl.trainer import RLTrainer
from longvila.train.trainer import Trainer, TrainResult


def make_trainer(recipe: Recipe) -> Trainer:
    """The trainer of the recipe's stage (stage 6, reinforcement learning, has its own loop)."""
    if recipe.stage.number == 6:
        return RLTrainer(recipe)
    return Trainer(recipe)


def train(recipe: Recipe) -> TrainResult:
    """Run one stage from its recipe."""
    return make_trainer(recipe).fit()
