"""The small pure parts behind the gateway's hardening: vLLM's refusals mapped to the client's fields,
request ids, the usage a stream is asked for and read from, lone surrogates, one result for many askers."""

import asyncio
import json

import pytest

from node_runtime.serving.gateway.errors import validation_message
from node_runtime.serving.gateway.openai_api import asking_usage, lone_surrogate
from node_runtime.serving.gateway.rejections import client_message, client_param, rejection
from node_runtime.serving.gateway.scope import request_id
from node_runtime.serving.gateway.shared import Shared
from node_runtime.serving.gateway.upstream import RelayedStream


def vllm_error(message: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}).encode()


@pytest.mark.parametrize("param, message, expected", [
    ("input_tokens", "This model's maximum context length is 512 tokens.", "prompts[2]"),
    ("input_text", "too long", "prompts[2]"),
    ("body.seed", "1 validation error", "seed"),
    ("max_tokens", "max_tokens=100000 cannot be greater than max_model_len=512.", "max_tokens"),
    (None, "n must be at least 1, got 0.", "n"),
    (None, "stop cannot contain an empty string.", "stop"),
    (None, "Token id 999999 is out of vocabulary", "prompts[2]"),
    (None, "temperature must be in [0, 2]", None),  # a field the client did not send: not guessed
    (None, "something else entirely", None),
])
def test_the_param_is_the_clients_field(param, message, expected):
    assert client_param(param, message, "prompts[2]", frozenset({"n", "stop", "seed", "max_tokens"})) == expected


def test_vllms_notes_and_pydantic_reprs_become_plain_messages():
    wrapped = ("1 validation error:\n  {'type': 'less_than_equal', 'loc': 'body.seed', 'msg': 'Input should be less than "
               "or equal to 9223372036854775807', 'input': '99999999999999999999999', 'ctx': {'le': 9223372036854775807}}")
    assert client_message(wrapped) == "seed: Input should be less than or equal to 9223372036854775807"
    noted = "Please reduce the length of the input prompt. (parameter=input_tokens, value=" + "Hello " * 100 + ")"
    assert client_message(noted) == "Please reduce the length of the input prompt."
    assert client_message("") == "the model server refused the request without a reason"
    refused = rejection(400, vllm_error("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
                                        "prompt"), prompt_field="messages", sent=frozenset({"messages"}), where="here")
    assert (refused.status, refused.param, refused.code) == (400, "messages", "upstream_rejected")
    assert refused.message == "here: Either prompt or prompt_embeds must be provided and non-empty."
    assert rejection(500, b"Internal Server Error", prompt_field="prompt", sent=frozenset()).message == "Internal Server Error"


def test_pydantic_locations_without_union_tags():
    errors = [{"type": "string_type", "loc": ("stop", "function-after[_unicode_text(), constrained-str]"), "msg": "Input should be a valid string"},
              {"type": "string_type", "loc": ("stop", "list[function-after[_unicode_text(), constrained-str]]", 0),
               "msg": "Input should be a valid string"},
              {"type": "extra_forbidden", "loc": ("max_token",), "msg": "Extra inputs are not permitted"}]
    assert validation_message(errors) == ("stop: Input should be a valid string; stop[0]: Input should be a valid string; "
                                          "max_token: unknown field", "stop")


def _scope(request_id_header: bytes | None) -> dict:
    return {"headers": [(b"x-request-id", request_id_header)] if request_id_header is not None else []}


@pytest.mark.parametrize("sent, kept", [
    (b"abc-123", True), (b"x" * 128, True), (b"x" * 129, False), (b"", False), (b"has space", False), (b"caf\xc3\xa9", False),
])
def test_a_clients_request_id_is_kept_only_when_short_and_plain(sent, kept):
    scope = _scope(sent)
    rid = request_id(scope)
    assert (rid == sent.decode("latin-1")) == kept
    assert kept or len(rid) == 32
    assert request_id(scope) == rid  # one id per request


@pytest.mark.parametrize("payload, spliced, relayed", [
    ({"model": "m", "stream": True}, {"stream_options": {"include_usage": True}, "model": "m", "stream": True}, False),
    ({"stream": True, "stream_options": {"include_usage": True}}, None, True),
    ({"stream": True, "stream_options": {"include_usage": False, "continuous_usage_stats": True}},
     {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, False),
    ({"stream": True, "stream_options": None}, {"stream": True, "stream_options": {"include_usage": True}}, False),
    ({"stream": True, "stream_options": "yes"}, None, True),
])
def test_a_stream_asks_for_its_usage(payload, spliced, relayed):
    body = b"  " + json.dumps(payload).encode()
    sent, client_asked = asking_usage(payload, body)
    assert client_asked == relayed
    assert (json.loads(sent) if spliced is not None else sent) == (spliced if spliced is not None else body)


def test_lone_surrogates_are_found_by_field():
    assert lone_surrogate({"prompt": "ok \U0001f600"}) is None
    assert lone_surrogate({"messages": [{"role": "user", "content": "a"}, {"content": "\ud800"}]}) == "messages[1].content"
    assert lone_surrogate(["\udc00"]) == "[0]"


class _Keys:
    def __init__(self):
        self.charged = []

    def charge(self, scope, prompt, completion):
        self.charged.append((prompt, completion))


def _stream(relay_usage: bool) -> RelayedStream:
    stream = RelayedStream.__new__(RelayedStream)  # its chunk handling alone, without a replica's answer
    stream.relay_usage, stream.usage, stream._held = relay_usage, None, b""
    return stream


EVENTS = [b'data: {"choices": [{"text": "a"}]}\n\n', b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
          b"data: [DONE]\n\n"]


@pytest.mark.parametrize("relay", [False, True])
def test_the_usage_event_is_read_and_relayed_only_when_asked_for(relay):
    stream = _stream(relay)
    data = b"".join(EVENTS)
    relayed = stream._with_usage_noted(data[:50]) + stream._with_usage_noted(data[50:])  # an event split across reads
    assert stream.usage == (3, 2)
    assert relayed == (data if relay else EVENTS[0] + EVENTS[2])


def test_one_result_for_many_askers_and_a_failure_not_kept():
    made = []

    async def make():
        made.append(1)
        await asyncio.sleep(0.01)
        if len(made) == 2:
            raise RuntimeError("failed once")
        return len(made)

    async def scenario():
        shared = Shared(make, ttl_s=3600)
        assert await asyncio.gather(*(shared.get() for _ in range(20))) == [1] * 20
        assert await shared.get() == 1 and len(made) == 1  # fresh: not made again
        shared.ttl_s = 0
        with pytest.raises(RuntimeError):
            await shared.get()
        shared.ttl_s = 3600
        assert await shared.get() == 3  # the failure was not kept

    asyncio.run(scenario())
