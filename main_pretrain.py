"""Train / fine-tune the teacher and student zoo. See README.md, section "Pretraining"."""
import hydra

import src.schema  # noqa: F401  (config schemas and resolvers)
from src.experiments import pretrain
from src.entry import entry


@hydra.main(version_base="1.3", config_path="config", config_name="pretrain/pretrain")
def main(cfg):
    return entry(pretrain.run, cfg)


if __name__ == "__main__":
    main()
