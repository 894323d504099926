"""Every transfer method (a `Method` subclass) under one name, `src.methods.<Class>`, and the one builder
(`build_method`) the experiment families use."""
from .base import HPARAM_RULES, NEEDS, CrossEntropy, FrozenOutputs, Method  # noqa: F401
from .feature import CD, CRD, similarity_kl  # noqa: F401
from .kd import KL, KLDP, MCL, PARTITIONS, dp_route, kl_to_target, topk_restrict  # noqa: F401
from .multi import (EnsembleTeacher, MultiKLDP, mean_softmax_logits, multi_route, recompute_bn_stats,  # noqa: F401
                    route_shares, uniform_soup)
from .gan import GANTraining  # noqa: F401
from .aft import AFT, BTuning, FeatureKD, FeatureTable  # noqa: F401
from .kdep import KDEP  # noqa: F401
from .dense import Detection, Segmentation  # noqa: F401  (KDEP's dense fine-tuning tasks)
from .zeroshot import KDAT, ZeroShot  # noqa: F401
from .targets import canonical_target, same_target  # noqa: F401
from .build import (build_method, check_method_node, check_modality, method_choice, method_class,  # noqa: F401
                    method_hparams, method_needs, methods_for)
