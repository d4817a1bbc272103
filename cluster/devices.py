"""The device of a Ray actor (a bulk-import encoder) or a Serve replica, decided by what Ray gave it, not by what
torch can see.

Ray no longer hides the GPUs from an actor that asked for none (``num_gpus: 0``): torch would find ``cuda:0`` and
load one uncounted copy of the model there per actor. An actor or replica without a GPU of Ray's runs on the CPU. One
with a fraction of a GPU (two applications sharing a card, 0.3 + 0.6) is capped at that fraction of the card's
memory: the caching allocator keeps what it freed, and without a cap one process could starve the other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from cluster.permanent import PermanentFailure
from common.config import ServiceSettings

logger = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


@dataclass(frozen=True)
class Placement:
    force_cpu: bool  # Ray gave no GPU: the model must not go on one
    memory_fraction: float | None  # Ray gave part of a GPU: the share of its memory this process may hold


def placement(device: str, assigned: Mapping[str, float]) -> Placement:
    """From the device setting and the resources Ray assigned (``get_assigned_resources()``: {"GPU": 0.3, ...})."""
    gpus = float(assigned.get("GPU", 0.0))
    if gpus <= 0:
        if device == "cuda":
            # Every replica or actor of the same options gets no GPU either: not worth another start.
            raise PermanentFailure.of(
                "--device cuda was asked for, but Ray gave this actor no GPU (num_gpus 0): give it a GPU share "
                "(--gpus-per-actor, or ray_actor_options num_gpus), or leave --device at auto"
            )
        return Placement(force_cpu=device != "mps", memory_fraction=None)  # Ray does not count Apple's GPU
    return Placement(force_cpu=False, memory_fraction=gpus if gpus < 1 else None)


def apply_placement(settings: SettingsT, chosen: Placement) -> SettingsT:
    """The settings to load the model with; caps this process's CUDA memory at its fraction first."""
    if chosen.memory_fraction is not None:
        import torch

        if torch.cuda.is_available():
            # Ray set CUDA_VISIBLE_DEVICES to this actor's GPU: it is device 0 here.
            torch.cuda.set_per_process_memory_fraction(chosen.memory_fraction, 0)
            logger.info("CUDA memory capped at %.0f%% of the GPU (this actor's share)", chosen.memory_fraction * 100)
    if chosen.force_cpu and not settings.force_cpu:
        logger.info("Ray gave this actor no GPU: the model runs on the CPU")
        return settings.model_copy(update={"force_cpu": True})
    return settings


def place_on_ray_resources(settings: SettingsT) -> SettingsT:
    """In a Ray actor or Serve replica, before the model is loaded: its settings for the resources Ray gave it."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return settings  # not in a Ray worker (the class used directly, in a driver): Ray assigned nothing
    assigned = ray.get_runtime_context().get_assigned_resources()
    return apply_placement(settings, placement(settings.device, assigned))
