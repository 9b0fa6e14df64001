"""Network changes used by the adversarial trainers: pure PyTorch modules plus functions that
patch dynamic_network_architectures networks (PlainConvUNet / ResidualEncoderUNet) in place.

* :mod:`.dual_norm`: dual batch/instance normalisation (Han et al. 2021).
* :mod:`.nlce`: non-local context encoder (He et al. 2019).
"""
from nnunet_adv.modules.dual_norm import (
    ADV,
    CLEAN,
    DualNorm,
    DualRouteWrapper,
    convert_to_dual_norm,
    dual_norms,
    end_statistics_warm_ups,
    forward_dual,
    norm_route,
    set_norm_route,
    start_fresh_statistics,
)
from nnunet_adv.modules.nlce import NLCE, ContextEncoding, NonLocalBlock, insert_nlce

__all__ = [
    "ADV", "CLEAN", "DualNorm", "DualRouteWrapper", "convert_to_dual_norm", "dual_norms",
    "forward_dual", "norm_route", "set_norm_route", "start_fresh_statistics", "end_statistics_warm_ups",
    "NLCE", "ContextEncoding", "NonLocalBlock", "insert_nlce",
]
