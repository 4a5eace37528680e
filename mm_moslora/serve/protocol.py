"""The OpenAI chat-completions protocol: request validation into engine terms, responses and errors.

Only what the engine honours is accepted. A field with a meaning the engine cannot give (n > 1, seed, tools,
penalties, logprobs...) is refused with a 400 naming it rather than ignored, so a client never gets an
answer made under settings other than those it asked for.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..data.conversation import IMAGE_PLACEHOLDER


class APIError(Exception):
    """A request the server refuses: HTTP status + OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Defaults:
    """What a request gets for a field it leaves out (the server's flags)."""
    temperature: float = 0.2
    top_p: float = 1.0
    max_tokens: int = 512


@dataclass
class ChatRequest:
    """A validated chat-completions request. messages: engine messages (string contents, `<image>` where each
    image goes); image_urls: the URLs of those images, in order (decoded later, off the event loop)."""
    messages: list[dict]
    image_urls: list[str]
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


# Fields a client may send with their default value only: anything else has no effect here, so it is refused.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": None,
           "logit_bias": None, "parallel_tool_calls": None, "tools": None, "tool_choice": None, "seed": None,
           "response_format": {"type": "text"}, "service_tier": None, "store": False, "metadata": None}
HANDLED = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
           "max_completion_tokens", "stop", "user"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _number(payload: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{name}' must be a number, got {type(value).__name__}", name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad_request(f"'{name}' must be in {interval}, got {value}", name)
    return float(value)


def parse_chat_request(payload, model_name: str, defaults: Defaults, max_images: int) -> ChatRequest:
    """The JSON body of POST /v1/chat/completions -> ChatRequest; raises APIError (400, or 404 for the model)."""
    if not isinstance(payload, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(payload).__name__}")
    for name in payload:
        if name in HANDLED:
            continue
        if name not in NEUTRAL:
            raise bad_request(f"unknown or unsupported parameter '{name}'", name)
        if payload[name] != NEUTRAL[name] and payload[name] is not None:
            raise bad_request(f"'{name}'={payload[name]!r} is not supported by this server (batched generation "
                              f"with one shared sampler, one choice, text replies); leave it out", name)
    if "model" not in payload:
        raise bad_request("'model' is required (GET /v1/models lists it)", "model")
    if payload["model"] != model_name:
        raise APIError(404, f"the model {payload['model']!r} does not exist; this server serves {model_name!r}",
                       code="model_not_found", param="model")
    messages, image_urls = parse_messages(payload.get("messages"), max_images)
    stream = payload.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be true or false", "stream")
    options = payload.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad_request("'stream_options' takes only {\"include_usage\": true|false}", "stream_options")
    if options and not stream:
        raise bad_request("'stream_options' is only allowed with stream: true", "stream_options")
    temperature = _number(payload, "temperature", 0.0, 2.0)
    top_p = _number(payload, "top_p", 0.0, 1.0, low_open=True)
    max_tokens = _max_tokens(payload, defaults.max_tokens)
    return ChatRequest(messages, image_urls, defaults.temperature if temperature is None else temperature,
                       defaults.top_p if top_p is None else top_p, max_tokens, _stop(payload.get("stop")), stream,
                       bool(options.get("include_usage")))


def _max_tokens(payload: dict, default: int) -> int:
    names = [n for n in ("max_completion_tokens", "max_tokens") if payload.get(n) is not None]
    if len(names) == 2 and payload[names[0]] != payload[names[1]]:
        raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; send one", "max_tokens")
    if not names:
        return default
    value = payload[names[0]]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request(f"'{names[0]}' must be a positive integer, got {value!r}", names[0])
    return value


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad_request("'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop")
    return stops


def parse_messages(messages, max_images: int) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> (engine messages, image URLs in order).

    Content is a string or a list of parts ({"type": "text", "text"}, {"type": "image_url", "image_url":
    {"url"}}); parts are joined by newlines with `<image>` where each image was, so [image, text] gives
    LLaVA's "<image>\\nquestion". System (and "developer") messages come first; consecutive messages of one
    role are joined by a newline; the last message is the user's.
    """
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    result: list[dict] = []
    image_urls: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", "messages")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise bad_request(f"{where}: role {message.get('role')!r} is not supported (system, user, assistant)",
                              "messages")
        extra = set(message) - {"role", "content"}
        if extra:
            raise bad_request(f"{where}: unsupported field(s) {sorted(extra)} (role and content only)", "messages")
        text, urls = _content(message.get("content"), where, images_allowed=role == "user")
        image_urls += urls
        if role == "system" and any(m["role"] != "system" for m in result):
            raise bad_request(f"{where}: a system message must come before the conversation", "messages")
        if result and result[-1]["role"] == role:
            result[-1]["content"] += "\n" + text
        else:
            result.append({"role": role, "content": text})
    if len(image_urls) > max_images:
        raise bad_request(f"the messages carry {len(image_urls)} images; this server takes at most {max_images} "
                          f"per request (--max-images)", "messages")
    if result[-1]["role"] != "user":
        raise bad_request("the last message must be the user's", "messages")
    return result, image_urls


def _content(content, where: str, images_allowed: bool) -> tuple[str, list[str]]:
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise bad_request(f"{where}: 'content' must be a string or a non-empty list of parts", "messages")
    pieces, urls = [], []
    for k, part in enumerate(parts):
        here = f"{where}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{here}: 'text' must be a string", "messages")
            if IMAGE_PLACEHOLDER in text:
                raise bad_request(f"{here}: text may not contain {IMAGE_PLACEHOLDER!r}; send images as image_url "
                                  f"parts", "messages")
            pieces.append(text)
        elif kind == "image_url":
            if not images_allowed:
                raise bad_request(f"{here}: images are only allowed in user messages", "messages")
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad_request(f"{here}: 'image_url' must be {{\"url\": \"data:image/...;base64,...\"}}",
                                  "messages")
            if isinstance(image, dict) and image.get("detail", "auto") not in ("auto", "low", "high"):
                raise bad_request(f"{here}: 'detail' must be auto, low or high", "messages")
            pieces.append(IMAGE_PLACEHOLDER)
            urls.append(url)
        else:
            raise bad_request(f"{here}: part type {kind!r} is not supported (text and image_url)", "messages")
    return "\n".join(pieces), urls


# ---- responses ---------------------------------------------------------------------------------------------

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               ) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, with_usage: dict | None = None,
          ) -> dict:
    """One server-sent event of a streamed completion (choices empty for the final usage event)."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if with_usage else [{"index": 0, "delta": delta, "logprobs": None,
                                               "finish_reason": finish_reason}]}
    if with_usage:
        body["usage"] = with_usage
    return body

