"""General knowledge transfer between a teacher and a student. See README.md, "General knowledge transfer"."""
import hydra

import src.schema  # noqa: F401  (config schemas and resolvers)
from src.experiments import transfer
from src.entry import entry


@hydra.main(version_base="1.3", config_path="config", config_name="transfer/transfer")
def main(cfg):
    return entry(transfer.run, cfg)


if __name__ == "__main__":
    main()
