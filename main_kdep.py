"""KDEP: knowledge distillation as efficient pre-training, then downstream fine-tuning. See README.md, "KDEP"."""
import hydra

import src.schema  # noqa: F401  (config schemas and resolvers)
from src.experiments import kdep
from src.entry import entry


@hydra.main(version_base="1.3", config_path="config", config_name="kdep/kdep")
def main(cfg):
    return entry(kdep.run, cfg)


if __name__ == "__main__":
    main()
