from environments.base import Environment, Task, Verdict, load_environment

__all__ = ["Environment", "Task", "Verdict", "load_environment"]
