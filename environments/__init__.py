from environments.base import Environment, Task, Verdict, load_environment
from environments.loaders import PREPARERS, prepare_dataset  # python -m sdpo.data prepare
from environments.multi_turn import EpisodeState, MultiTurnEnvironment, function_tool, is_multi_turn

__all__ = ["PREPARERS", "Environment", "EpisodeState", "MultiTurnEnvironment", "Task", "Verdict", "function_tool",
           "is_multi_turn", "load_environment", "prepare_dataset"]
