"""Attribution methods: each ``fit(train)`` then ``score(queries) -> Scores``."""

from .base import TopK
from .graddot import GradDot, GradDotConfig
from .influence import Influence, InfluenceConfig
from .inrun import InRunShapley
from .source import Source
from .tracin import TracIn
from .trak import TRAK

__all__ = ["TRAK", "GradDot", "GradDotConfig", "InRunShapley", "Influence", "InfluenceConfig", "Source", "TopK",
           "TracIn"]
