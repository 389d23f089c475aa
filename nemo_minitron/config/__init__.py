"""Recipe dataclasses, YAML loading and ``key=value`` overrides.

A recipe is YAML with one section per dataclass (``model``, ``parallel``, ``data``,
``train``). Every field keeps Megatron's name. Overrides use dotted keys
(``train.lr=3e-4``) and are parsed as YAML scalars. User errors raise ``ConfigError``, a
``ValueError`` whose message names the field and the rule.

Modules: ``errors`` (``ConfigError``), ``dicts`` (YAML/overrides <-> dicts <-> dataclasses),
``model`` (``ModelConfig``, ``ParallelConfig``, the TP/PP divisibility rule, Megatron's
``TransformerConfig``), ``recipe`` (data, training, recipes, ``load_recipe``). The names
below are the package's; importing one module of it does not import the others' users.
"""

from nemo_minitron.config.dicts import (
    from_dict,
    load_yaml,
    merge,
    parse_overrides,
    recipe_path,
    to_dict,
)
from nemo_minitron.config.errors import ConfigError
from nemo_minitron.config.model import (
    ModelConfig,
    ParallelConfig,
    check_divisible,
    layout_divisor,
)
from nemo_minitron.config.recipe import (
    DataConfig,
    Recipe,
    StageRecipe,
    TrainConfig,
    load_recipe,
)

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "ParallelConfig", "Recipe",
           "StageRecipe", "TrainConfig", "check_divisible", "from_dict", "layout_divisor",
           "load_recipe", "load_yaml", "merge", "parse_overrides", "recipe_path", "to_dict"]
