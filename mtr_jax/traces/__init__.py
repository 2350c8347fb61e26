"""The trace grammar: chat-template rendering with loss masks (render), and the turn parser (parse)."""

from mtr_jax.traces.parse import ERROR_CODES, ParsedTurn, parse_turn
from mtr_jax.traces.render import (
    SYSTEM_PROMPT,
    assistant_text_to_message,
    build_messages,
    observation_text,
    render_prompt_ids,
    render_trace,
    tool_turn_ids,
)

__all__ = [
    "ERROR_CODES",
    "ParsedTurn",
    "parse_turn",
    "SYSTEM_PROMPT",
    "assistant_text_to_message",
    "build_messages",
    "observation_text",
    "render_prompt_ids",
    "render_trace",
    "tool_turn_ids",
]
