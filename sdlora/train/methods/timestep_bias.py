"""Timestep bias (train.timestep_bias): the objective draws its timesteps skewed towards the noisy ("high") or the
clean ("low") end, with train.timestep_bias_strength (sdlora.objectives.with_bias)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdlora.train.methods.base import Method

if TYPE_CHECKING:
    from sdlora.config import TrainConfig


class TimestepBias(Method):
    name = "timestep_bias"

    def active(self, tc: TrainConfig) -> bool:
        return tc.timestep_bias != "none"

    def shape_objective(self, objective: Any, tc: TrainConfig) -> Any:
        from sdlora import objectives

        return objectives.with_bias(objective, tc.timestep_bias, tc.timestep_bias_strength)


METHOD = TimestepBias()
