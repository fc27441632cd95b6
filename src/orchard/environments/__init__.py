"""Environments for tool use: the `Tool` and `ToolEnvironment` interface (`base`), the built-in
calculator (`calculator`) and the built-in world's lookup, data and questions (`world`), and the
multi-turn episodes that interleave a model's replies with tool results (`episodes`)."""

from .base import Step, Tool, ToolEnvironment, ToolError, brief_listing, with_system_line
from .calculator import CALCULATOR, calculate
from .episodes import Episode, environment_factory, run_episodes
from .world import TOOL_TASKS, lookup_tool, tool_conversations, tool_questions, world_tools

__all__ = ["CALCULATOR", "TOOL_TASKS", "Episode", "Step", "Tool", "ToolEnvironment", "ToolError", "brief_listing", "calculate",
           "environment_factory", "lookup_tool", "run_episodes", "tool_conversations", "tool_questions",
           "with_system_line", "world_tools"]
