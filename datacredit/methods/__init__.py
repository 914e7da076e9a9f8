"""Attribution methods: each ``fit(train)`` then ``score(queries) -> Scores``; each takes one frozen config
(``GradDot(model, task, config=GradDotConfig(normalize=True))``, or the same fields as keywords)."""

from .base import TopK
from .graddot import GradDot, GradDotConfig
from .influence import Influence, InfluenceConfig
from .inrun import InRunConfig, InRunShapley
from .source import Source, SourceConfig
from .tracin import TracIn, TracInConfig
from .trak import TRAK, TRAKConfig

__all__ = ["TRAK", "GradDot", "GradDotConfig", "InRunConfig", "InRunShapley", "Influence", "InfluenceConfig",
           "Source", "SourceConfig", "TRAKConfig", "TopK", "TracIn", "TracInConfig"]
