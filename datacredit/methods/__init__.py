"""Attribution methods: each ``fit(train)`` then ``score(queries) -> Scores``."""

from .graddot import GradDot, GradDotConfig

__all__ = ["GradDot", "GradDotConfig"]
