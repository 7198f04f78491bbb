"""flwr-splitfed: SplitFed (split learning with federated averaging) for Flower, on PyTorch.

Everything public is imported from here::

    from splitfed import SplitFed, split_model, train_client_half

The core (cutting a model, the client's training loop, the split server and its wire format, the
server-half update rules) lives in this package's modules; the Flower strategy in
:mod:`splitfed.strategies`, which builds on the core and is never imported by it.
"""

from .advisor import CutCost, cut_costs
from .batched import BatchedSFLV1Trainer
from .checkpoint import CheckpointConfig, CheckpointError
from .client import evaluate_client_half, train_client_half
from .config import OptimizerConfig, ServerCopies, Variant
from .cut import (
    CutError,
    CutPoint,
    SplitModel,
    cut_points,
    default_aux_head,
    join_halves,
    split_model,
)
from .dataplane import (
    Acknowledgement,
    DataPlane,
    Exchange,
    GrpcDataPlane,
    LocalLossDataPlane,
    SplitServerError,
)
from .monitor import LeakageEstimate, LeakageMonitor
from .privacy import PrivacyConfig, PrivacyConfigError
from .protocol import DataPlaneTicket, Mode
from .server import BatchError, RoundStats, SplitServer
from .server_half import ServerHalfTrainer, SFLV1Trainer, SFLV2Trainer, StepResult, make_trainer
from .strategies import SplitFed, SplitFedResult, SplitFedRunError
from .tls import TLSCredentials, TLSError
from .training import (
    BatchSpec,
    EvaluateStats,
    LocalLossStats,
    TrainStats,
    evaluate_locally,
    run_local_epochs,
    run_local_loss_epochs,
)

__version__ = "0.2.0"

__all__ = [
    "Acknowledgement",
    "BatchError",
    "BatchSpec",
    "CheckpointConfig",
    "CheckpointError",
    "CutCost",
    "CutError",
    "CutPoint",
    "DataPlane",
    "DataPlaneTicket",
    "EvaluateStats",
    "Exchange",
    "GrpcDataPlane",
    "LeakageEstimate",
    "LeakageMonitor",
    "LocalLossDataPlane",
    "LocalLossStats",
    "Mode",
    "OptimizerConfig",
    "PrivacyConfig",
    "PrivacyConfigError",
    "RoundStats",
    "SFLV1Trainer",
    "BatchedSFLV1Trainer",
    "SFLV2Trainer",
    "ServerCopies",
    "ServerHalfTrainer",
    "SplitFed",
    "SplitFedResult",
    "SplitFedRunError",
    "SplitModel",
    "SplitServer",
    "SplitServerError",
    "StepResult",
    "TLSCredentials",
    "TLSError",
    "TrainStats",
    "Variant",
    "cut_costs",
    "cut_points",
    "default_aux_head",
    "evaluate_client_half",
    "evaluate_locally",
    "join_halves",
    "make_trainer",
    "run_local_epochs",
    "run_local_loss_epochs",
    "split_model",
    "train_client_half",
]
