"""The one typed config of a distillation run: YAML file + `--section.key value` overrides.

Every default is defined once, in these files (the CLI only builds the object):
  sections.py   student, data, mix, loss, rollout, optim, train, output, and ConfigError
  teacher.py    teacher / teachers (TeacherConfig.kind) and the rules about teachers
  run.py        Config: the whole run, the rules across sections, check_vocab_bounds
  loading.py    load_config, read_yaml, overrides, describe_config
"""

from protege.config.loading import (describe_config, load_config, merge_dicts, parse_overrides, read_yaml,
                                    set_dotted)
from protege.config.run import Config, check_vocab_bounds
from protege.config.sections import (ConfigError, DataConfig, LoraConfig, LossConfig, MixConfig, OptimConfig,
                                     OutputConfig, RolloutConfig, StudentConfig, TrainConfig)
from protege.config.teacher import (NamedTeacherConfig, TeacherConfig, check_cache, check_teachers_config,
                                    teacher_configs)

__all__ = ["Config", "ConfigError", "DataConfig", "LoraConfig", "LossConfig", "MixConfig", "NamedTeacherConfig",
           "OptimConfig", "OutputConfig", "RolloutConfig", "StudentConfig", "TeacherConfig", "TrainConfig",
           "check_cache", "check_teachers_config", "check_vocab_bounds", "describe_config", "load_config",
           "merge_dicts", "parse_overrides", "read_yaml", "set_dotted", "teacher_configs"]
