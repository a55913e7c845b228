"""Training: recipes (YAML -> typed config), the five stages, the loop, resumable checkpoints.

from longvila.train import load_recipe, train
result = train(load_recipe("tiny/stage1", overrides=["--run.root", "runs/demo"]))
"""

from longvila.train.recipe import Recipe, load_recipe, packaged_recipes, parse_overrides
from longvila.train.run import make_trainer, train
from longvila.train.trainer import Trainer, TrainResult, build_model

__all__ = [
    "Recipe",
    "TrainResult",
    "Trainer",
    "build_model",
    "load_recipe",
    "make_trainer",
    "packaged_recipes",
    "parse_overrides",
    "train",
]
