"""The DIVA objectives as plain modules and functions (paper Eq. 5-13); no Lightning here."""

from diva_lightning.objectives.alignment import (
    SharedAlignment,
    directed_info_nce,
    gather_from_ranks,
    infonce_lower_bound,
)
from diva_lightning.objectives.club import NCECLUB, GaussianCLUB, build_unique_estimator
from diva_lightning.objectives.encoders import FactorEncoders, Factors, build_factor_encoder
from diva_lightning.objectives.readouts import LogitInjection, LowRankReadout, injected_loss
from diva_lightning.objectives.regularizers import LinearRamp, orthogonality, orthogonality_loss

__all__ = [
    "NCECLUB",
    "FactorEncoders",
    "Factors",
    "GaussianCLUB",
    "LinearRamp",
    "LogitInjection",
    "LowRankReadout",
    "SharedAlignment",
    "build_factor_encoder",
    "build_unique_estimator",
    "directed_info_nce",
    "gather_from_ranks",
    "infonce_lower_bound",
    "injected_loss",
    "orthogonality",
    "orthogonality_loss",
]
