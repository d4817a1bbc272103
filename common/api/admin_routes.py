"""Sleep and wake on demand, for a program that shares the GPU (an image generator): ``POST /admin/sleep`` frees
the model's memory now (``{"hold": true}``: and keeps it free, answering embedding requests with 503 ``asleep``
until ``POST /admin/wake``), ``POST /admin/wake`` brings the model back and answers once it serves. Both answer with
the new state and the seconds the call took, and like every route but /health and /metrics they need the API key
when one is set."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from common.api.app import Model
from common.api.json_body import JSONBodyRoute
from common.residency import State

router = APIRouter(route_class=JSONBodyRoute, tags=["admin"])


class SleepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hold: StrictBool = Field(
        False, description="keep the model asleep: embedding requests get 503 'asleep' until POST /admin/wake"
    )


class TransitionResponse(BaseModel):
    state: State = Field(description="awake, asleep or held")
    seconds: float = Field(description="how long the call took (the release or the wake)")


@router.post("/admin/sleep", response_model=TransitionResponse, summary="Free the model's memory now")
async def sleep(model: Model, body: SleepRequest | None = None) -> TransitionResponse:
    """Once the requests already queued are done, the weights leave the device (``offload``) or memory
    (``unload``). Without a hold, the next embedding request wakes the model again."""
    done = await model.runtime.residency.sleep("admin", hold=body is not None and body.hold)
    return TransitionResponse(state=done.state, seconds=round(done.seconds, 3))


@router.post("/admin/wake", response_model=TransitionResponse, summary="Bring the model back now")
async def wake(model: Model) -> TransitionResponse:
    """Ends a hold; answers once the model serves (503 ``out_of_memory`` or ``not_ready`` if the wake failed)."""
    done = await model.runtime.residency.wake()
    return TransitionResponse(state=done.state, seconds=round(done.seconds, 3))
