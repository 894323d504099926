"""Pure functions on predictions (logits tensors, labels). They import nothing else from the suite."""
from .classification import accuracy, agreement, ece, kl_divergence, nll  # noqa: F401
from .flips import (class_concentration, ensemble_accuracy, flips, per_class_flips, routing_shares,  # noqa: F401
                    transfer_metrics, transfer_report)
from .cka import cka, linear_cka, rbf_cka  # noqa: F401
from .cka import cka_matrix  # noqa: F401
from .pairwise import agreement_counts, flip_counts, kl_matrix, pairwise_stats  # noqa: F401
