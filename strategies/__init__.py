"""Flower strategies that drive SplitFed rounds (imported as ``splitfed.strategies``)."""

from .failures import SplitFedRunError
from .splitfed import SplitFed, SplitFedResult

__all__ = ["SplitFed", "SplitFedResult", "SplitFedRunError"]
