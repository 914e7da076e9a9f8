"""datacredit: which training examples made a PyTorch model behave as it does, and by how much.

Sign convention everywhere: ``score[i, j] > 0`` means training example i helps query j (lowers its loss).
"""

from . import capture, curvature, data, ensembles, evaluate, report
from ._version import __version__ as __version__
from .capture import Capture, ExampleGrads
from .curvature import Damping
from .errors import DataCreditError, DataError, NonFiniteError, StoreError, UnsupportedModuleError
from .gradstore import GradientStore as GradientStore
from .methods import TRAK, GradDot, Influence, InRunShapley, Source, TracIn
from .scores import Scores
from .store import Store
from .task import ClassificationTask, LanguageModelingTask, Task
from .trajectory import Trajectory, TrajectoryRecorder

__all__ = [
    "TRAK",
    "Capture",
    "ClassificationTask",
    "DataCreditError",
    "Damping",
    "DataError",
    "ExampleGrads",
    "GradDot",
    "InRunShapley",
    "Influence",
    "LanguageModelingTask",
    "NonFiniteError",
    "Scores",
    "Source",
    "Store",
    "StoreError",
    "Task",
    "TracIn",
    "Trajectory",
    "TrajectoryRecorder",
    "UnsupportedModuleError",
    "capture",
    "curvature",
    "data",
    "ensembles",
    "evaluate",
    "report",
]
