"""Adaptive Feature Transfer from pretrained models' features into a small downstream model. See README.md, "AFT"."""
import hydra

import src.schema  # noqa: F401  (config schemas and resolvers)
from src.experiments import aft
from src.entry import entry


@hydra.main(version_base="1.3", config_path="config", config_name="aft/aft")
def main(cfg):
    return entry(aft.run, cfg)


if __name__ == "__main__":
    main()
