"""Flower strategies that drive SplitFed rounds."""

from .splitfed import SplitFed, SplitFedEvaluateFn, SplitFedResult

__all__ = ["SplitFed", "SplitFedEvaluateFn", "SplitFedResult"]
