from .base import CrossEntropy, FrozenOutputs, Method  # noqa: F401
from .feature import CD, CRD, similarity_kl  # noqa: F401
from .kd import KL, KLDP, MCL, PARTITIONS, dp_route, kl_to_target, topk_restrict  # noqa: F401
from .multi import (EnsembleTeacher, MultiKLDP, mean_softmax_logits, multi_route, recompute_bn_stats,  # noqa: F401
                    route_shares, uniform_soup)
from .gan import GANTraining  # noqa: F401
from .aft import AFT, BTuning, FeatureKD  # noqa: F401
from .kdep import KDEP  # noqa: F401
from .zeroshot import KDAT, ZeroShot  # noqa: F401
from .targets import canonical_target, same_target  # noqa: F401
