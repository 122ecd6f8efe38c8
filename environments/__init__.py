from environments.base import Environment, Task, Verdict, load_environment
from environments.loaders import PREPARERS, prepare_dataset  # python -m sdpo.data prepare

__all__ = ["PREPARERS", "Environment", "Task", "Verdict", "load_environment", "prepare_dataset"]
