"""Multi-turn environments: the async interface, tool-call parsing and the built-in lookup environment."""

from firetitan.envs.base import Env, EnvFactory, EnvStep, Message, make_group
from firetitan.envs.lookup import LookupEnv, every_key_rows, knowledge_base, lookup_rows
from firetitan.envs.tools import ToolCall, ToolCallParse, format_tool_call, parse_tool_call

__all__ = ["Env", "EnvFactory", "EnvStep", "LookupEnv", "Message", "ToolCall", "ToolCallParse", "every_key_rows",
           "format_tool_call", "knowledge_base", "lookup_rows", "make_group", "parse_tool_call"]
