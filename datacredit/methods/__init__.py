"""Attribution methods: each ``fit(train)`` then ``score(queries) -> Scores``."""

from .graddot import GradDot, GradDotConfig
from .influence import Influence, InfluenceConfig
from .inrun import InRunShapley

__all__ = ["GradDot", "GradDotConfig", "InRunShapley", "Influence", "InfluenceConfig"]
