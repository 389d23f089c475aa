"""nemo_minitron: structured pruning and knowledge distillation of Megatron-core GPT models."""

import warnings

__version__ = "0.1.0"

# megatron-core warns on import when Transformer Engine / apex are absent; their absence is the
# expected CPU configuration and the fallbacks are what we use, so keep the console clean.
warnings.filterwarnings(
    "ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*"
)
warnings.filterwarnings("ignore", message="full scope is deprecated.*")
# torch.distributed.checkpoint deprecations triggered inside megatron's dist_checkpointing.
warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*")
warnings.filterwarnings("ignore", message="Please use DTensor instead.*")
