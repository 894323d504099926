"""How a run's config names what a Trainer trains, for the Trainer's one-line errors (`RunLabels`): the method as
the config chose it (`method=kl_dp (KLDP)`: Hydra's choice of config/method file, else the file whose settings the
node matches best), its non-zero numeric settings by full key, and the full keys of the optimizer and trainer
nodes (`optimizer`, `finetune.optimizer`). The engine knows no configs; `Context.trainer` words the labels here."""
from __future__ import annotations

from typing import Optional, Tuple

from omegaconf import OmegaConf

from ..engine import RunLabels
from ..methods.build import method_choice



def full_key(node, default: str) -> str:
    """The dotted key of a config node in its config (`optimizer`, `finetune.optimizer`); `default` for a node
    that was built apart from the run's config (a typed zoo recipe, a plain dict or dataclass)."""
    try:
        key = node._get_full_key(None)
    except Exception:
        return default
    return str(key) if key else default


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def method_node(method, optim_cfg):
    """(key, node): the top-level node of the run's config whose `_target_` built `method` (`method`,
    `parallel_method`), found from the optimiser's node (same config tree); (None, None) when there is none."""
    try:
        root = optim_cfg._get_root()
    except AttributeError:
        return None, None
    if not OmegaConf.is_dict(root):
        return None, None
    cls = type(method).__name__
    for key in list(root.keys()):
        try:
            node = root.get(key)
        except Exception:  # an unresolvable interpolation elsewhere in the config
            continue
        if OmegaConf.is_dict(node) and str(node.get("_target_", "")).rsplit(".", 1)[-1] == cls:
            return str(key), node
    return None, None


def describe_method(method, optim_cfg) -> Tuple[Optional[str], list]:
    """('method=kl_dp (KLDP)', ['method.temperature=1.0', ...]): how the run's config names the trained method,
    and its non-zero numeric hyper-parameters (weights, temperatures: what makes a loss overflow) by full key.
    (None, []) for a method built without a config node (a plain classifier): the Trainer names it by its class
    and constructor settings."""
    key, node = method_node(method, optim_cfg)
    if node is None:
        return None, []
    choice = method_choice(key, node)
    name = f"{key}={choice} ({type(method).__name__})" if choice else f"{key}._target_={node.get('_target_')}"
    params = [f"{key}.{k}={v}" for k, v in node.items() if k != "_target_" and _number(v) and v != 0]
    return name, params[:6]


def run_labels(method, optim_cfg, trainer_cfg) -> RunLabels:
    """The labels of a Trainer of `method` with these optimizer and trainer nodes: the method as the config names
    it (from the optimiser node's config tree) and the nodes' full keys. A label never fails a run: a config
    that cannot be read for one gives the defaults (the method's class, `optimizer`, `trainer`)."""
    try:
        name, params = describe_method(method, optim_cfg)
        return RunLabels(name, tuple(params), full_key(optim_cfg, "optimizer"), full_key(trainer_cfg, "trainer"))
    except Exception:
        return RunLabels()
