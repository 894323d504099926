"""Knowledge transfer from several teachers into one student (sequential, parallel, soup, ensemble). See
config/multi_teacher/multi_teacher.yaml."""
import hydra

import src.schema  # noqa: F401  (config schemas and resolvers)
from src.experiments import multi_teacher
from src.entry import entry


@hydra.main(version_base="1.3", config_path="config", config_name="multi_teacher/multi_teacher")
def main(cfg):
    return entry(multi_teacher.run, cfg)


if __name__ == "__main__":
    main()
