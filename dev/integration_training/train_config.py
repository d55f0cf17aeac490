"""The config schema, under the name the shipped configs import it by (`from train_config import
TrainConfig`); it lives in `rollouts.recipes.config`."""

from rollouts.recipes.config import (
    DataConfig,
    ModelConfig,
    RLStageConfig,
    TargetConfig,
    TrainConfig,
)

__all__ = ["DataConfig", "ModelConfig", "RLStageConfig", "TargetConfig", "TrainConfig"]
