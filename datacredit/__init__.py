"""datacredit: which training examples made a PyTorch model behave as it does, and by how much.

Sign convention everywhere: ``score[i, j] > 0`` means training example i helps query j (lowers its loss).
"""

from . import capture, curvature, data, ensembles, evaluate, report, training
from ._version import __version__ as __version__
from .capture import Capture, ExampleGrads
from .curvature import Damping
from .errors import DataCreditError, DataError, NonFiniteError, StoreError, UnsupportedModuleError
from .generation import CompletionTask
from .gradstore import GradientStore
from .ledger import Ledger, PayoutRule, compensation
from .methods import (
    TRAK,
    GradDot,
    GradDotConfig,
    Influence,
    InfluenceConfig,
    InRunConfig,
    InRunShapley,
    Source,
    SourceConfig,
    TracIn,
    TracInConfig,
    TRAKConfig,
)
from .scores import Scores
from .sources import Sources, SourceValues
from .store import Store
from .task import ClassificationTask, LanguageModelingTask, Task
from .trajectory import Trajectory, TrajectoryRecorder

__all__ = [
    "TRAK",
    "TRAKConfig",
    "Capture",
    "ClassificationTask",
    "CompletionTask",
    "DataCreditError",
    "Damping",
    "DataError",
    "ExampleGrads",
    "GradDot",
    "GradDotConfig",
    "GradientStore",
    "InRunShapley",
    "InRunConfig",
    "Influence",
    "InfluenceConfig",
    "LanguageModelingTask",
    "Ledger",
    "NonFiniteError",
    "PayoutRule",
    "Scores",
    "SourceValues",
    "Sources",
    "Source",
    "SourceConfig",
    "Store",
    "StoreError",
    "Task",
    "TracIn",
    "TracInConfig",
    "Trajectory",
    "TrajectoryRecorder",
    "UnsupportedModuleError",
    "capture",
    "compensation",
    "curvature",
    "data",
    "ensembles",
    "evaluate",
    "report",
    "training",
]


def __dir__() -> list[str]:
    """``dir(datacredit)``: the public API (``__all__``) only. Submodules such as ``datacredit.errors`` or
    ``datacredit.models`` stay importable; they are just not advertised at the top level."""
    return sorted([*__all__, "__version__"])
