"""flwr-splitfed: SplitFed (split learning with federated averaging) for Flower, on PyTorch.

The core library: cutting a model, the client's training loop, the split server and its wire
format, and the server-half update rules. Flower strategies live in :mod:`strategies`.
"""

from .client import DataPlaneTicket, TrainStats, run_local_epochs, train_client_half
from .config import OptimizerConfig, Variant
from .cut import (
    CutError,
    LabelPrivateSplit,
    SplitModel,
    join_halves,
    split_label_private,
    split_model,
)
from .dataplane import (
    DataPlane,
    Exchange,
    GrpcDataPlane,
    LabelPrivateDataPlane,
    SplitServerError,
)
from .privacy import PrivacyConfig, PrivacyConfigError
from .server import BatchError, RoundStats, SplitServer, round_token
from .server_half import ServerHalfTrainer, SFLV1Trainer, SFLV2Trainer, StepResult, make_trainer
from .tls import TLSCredentials, TLSError

__all__ = [
    "BatchError",
    "CutError",
    "DataPlane",
    "DataPlaneTicket",
    "Exchange",
    "GrpcDataPlane",
    "LabelPrivateDataPlane",
    "LabelPrivateSplit",
    "OptimizerConfig",
    "PrivacyConfig",
    "PrivacyConfigError",
    "RoundStats",
    "SFLV1Trainer",
    "SFLV2Trainer",
    "ServerHalfTrainer",
    "SplitModel",
    "SplitServer",
    "SplitServerError",
    "StepResult",
    "TLSCredentials",
    "TLSError",
    "TrainStats",
    "Variant",
    "join_halves",
    "make_trainer",
    "round_token",
    "split_label_private",
    "run_local_epochs",
    "split_model",
    "train_client_half",
]
