"""Complementary knowledge: prediction flips between every pair of models. See README.md, "Prediction flips"."""
import hydra

import src.schema  # noqa: F401  (config schemas and resolvers)
from src.experiments import flips
from src.entry import entry


@hydra.main(version_base="1.3", config_path="config", config_name="prediction_flips/flips")
def main(cfg):
    return entry(flips.run, cfg)


if __name__ == "__main__":
    main()
