"""A replica's refusal as the client should read it: vLLM's error answers in our shape, `param` named
the way the client wrote the field, and vLLM's internal wording explained.

vLLM names some fields by its internals (`input_tokens`, `input_text`, `body.seed`), leaves `param`
null where its message starts with the field ("n must be at least 1", "stop cannot contain ..."), and wraps pydantic's errors in a
repr of their list. Only answers other than 200 come here: the fast path never parses a success.
"""

import json
import re

from node_runtime.serving.gateway.errors import GatewayError

# vLLM's names for the prompt, whatever the client called it.
PROMPT_PARAMS = frozenset({"input_tokens", "input_text", "prompt", "prompt_token_ids"})
# "... (parameter=max_tokens, value=100000)": the field is `param`; the value may be the whole prompt.
_PARAMETER_NOTE = re.compile(r"\s*\(parameter=[^,)]*(?:, value=.*)?\)\s*$", re.S)
_FIELD_FIRST = re.compile(r"^(\w+)\b")
_PYDANTIC = re.compile(r"'loc': '(?:body\.)?([^']+)', 'msg': '([^']*)'")


def _error_of(content: bytes) -> tuple[str, str | None]:
    try:
        error = json.loads(content)["error"]
        return str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        return content[:500].decode(errors="replace"), None


def client_param(param: str | None, message: str, prompt_field: str, sent: frozenset[str]) -> str | None:
    """The field the refusal is about, as the client named it; None when nothing says."""
    if param is not None:
        param = param.removeprefix("body.")
        return prompt_field if param in PROMPT_PARAMS else param
    if (first := _FIELD_FIRST.match(message)) and first[1] in sent:
        return first[1]
    if "out of vocabulary" in message:
        return prompt_field
    return None


def client_message(message: str) -> str:
    """vLLM's message without its internal notes: pydantic's errors as 'field: problem'."""
    problems = _PYDANTIC.findall(message)
    if problems:
        return "; ".join(f"{field}: {problem}" for field, problem in problems)
    return _PARAMETER_NOTE.sub("", message) or "the model server refused the request without a reason"


def rejection(status: int, content: bytes, *, prompt_field: str, sent: frozenset[str],
              where: str | None = None) -> GatewayError:
    """The replica's answer `status` (not 200) as our error. `prompt_field`: what the client calls the
    prompt (`prompt`, `prompts[3]`, `messages`); `sent`: the fields it sent; `where`: a prefix for the message."""
    message, param = _error_of(content)
    param = client_param(param, message, prompt_field, sent)
    message = client_message(message)
    if where:
        message = f"{where}: {message}"
    return GatewayError(status, message, param=param, code="upstream_rejected")
