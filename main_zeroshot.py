"""Zero-shot knowledge transfer by adversarial belief matching. See README.md, "Zero-shot knowledge transfer"."""
import hydra

import src.schema  # noqa: F401  (config schemas and resolvers)
from src.experiments import zeroshot
from src.entry import entry


@hydra.main(version_base="1.3", config_path="config", config_name="zeroshot/zeroshot")
def main(cfg):
    return entry(zeroshot.run, cfg)


if __name__ == "__main__":
    main()
