"""Failures that trying again would meet again, told apart from those worth a retry, across Ray's processes.

A Serve replica or an import actor that cannot load its model because there is no such model, or it is a model of
another kind, or its weights are broken or cannot be read (``PERMANENT_LOAD_ERRORS``), or that was given no GPU for
``--device cuda``, fails the same way however often it is started again: Serve starts it again forever, and Ray Data
ends the job with a traceback. Ray passes such an error on to the driver only as text (in Serve's deployment status,
in an ``ActorDiedError``), so it is raised as a ``PermanentFailure``, whose message starts with ``MARK``, and the
driver looks for that text (``permanent_reason``): the front door stops, the import says why, each with the
replica's or actor's own message.
"""

from __future__ import annotations

from common.loading import BrokenWeights, ModelNotFound, UnreadableModelFile, WrongModel

# No such model, another kind of model, a truncated or corrupt weights file, a file this process may not read.
PERMANENT_LOAD_ERRORS: tuple[type[Exception], ...] = (ModelNotFound, WrongModel, BrokenWeights, UnreadableModelFile)
MARK = "cannot start, and trying again would fail the same way: "


class PermanentFailure(RuntimeError):
    """A start-up failure that a new replica or actor would meet too. Built with ``of(reason)``; the message is
    ``MARK`` + the reason (one argument, so that the error pickles as it is across Ray's processes)."""

    @classmethod
    def of(cls, reason: str) -> PermanentFailure:
        return cls(MARK + reason)

    @property
    def reason(self) -> str:
        return str(self).removeprefix(MARK)


def permanent_reason(error: BaseException | str) -> str | None:
    """The reason of a permanent failure in ``error``, or None when it is worth a retry: an error of this process
    (or of a Ray task, whose cause Ray keeps) of ``PERMANENT_LOAD_ERRORS`` or a ``PermanentFailure``, or the text of a
    ``PermanentFailure`` in an error's message or in Serve's status (the text after ``MARK``)."""
    if isinstance(error, str):
        at = error.rfind(MARK)
        return error[at + len(MARK) :].strip() if at >= 0 else None
    from ray.exceptions import RayTaskError

    seen: set[int] = set()
    chain: list[BaseException | None] = [error]
    while chain:
        current = chain.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, RayTaskError) and isinstance(current.cause, BaseException):
            current = current.cause  # its str() is the remote traceback; the cause is the error itself
        if isinstance(current, PermanentFailure):
            return current.reason
        if isinstance(current, PERMANENT_LOAD_ERRORS):
            return str(current)
        found = permanent_reason(str(current))
        if found is not None:
            return found
        chain += [current.__cause__, current.__context__]
    return None
