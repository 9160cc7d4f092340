"""MONAI FL filters applied by ``MonaiAlgo`` to what a site sends (``post_weight_filters``)."""

from __future__ import annotations

from monai.fl.utils.exchange_object import ExchangeObject
from monai.fl.utils.filters import Filter

from .exchange import FROZEN_VARS, split_keys


class ExcludeFrozenWeights(Filter):
    """Drop the weights whose names match ``exclude_vars`` (default: the frozen image encoder) before sending.

    ``MonaiAlgo.get_weights`` returns every state-dict entry (weight differences of the frozen encoder are all
    zero); this filter keeps only the trainable part, which is what the server aggregates.
    """

    def __init__(self, exclude_vars: str = FROZEN_VARS) -> None:
        self.exclude_vars = exclude_vars

    def __call__(self, data: ExchangeObject, extra: dict | None = None) -> ExchangeObject:
        if not isinstance(data, ExchangeObject):
            raise ValueError(f"expected an ExchangeObject but received {type(data).__name__}")
        if data.weights:
            sent, _ = split_keys(data.weights, self.exclude_vars)
            if not sent:
                raise ValueError(f"exclude_vars {self.exclude_vars!r} excludes every weight: nothing left to send")
            data.weights = {key: data.weights[key] for key in sent}
        return data
