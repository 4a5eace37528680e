"""The OpenAI-compatible server, driven by the official `openai` client: answers equal the engine's, streaming,
multi-turn with an image, batching of concurrent clients, and every bad request refused with its own error
while the server keeps serving. One tiny-model server (in a thread) for the whole module.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from PIL import Image

from mm_moslora.infer import InferenceEngine, ReplyOptions, Request
from mm_moslora.serve import cli
from mm_moslora.serve.app import Service
from mm_moslora.serve.cli import BackgroundServer, config_from_args, listen, parse_args

KEY = "test-key"
MAX_NEW = 6


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds a few bytes of data: decoding it would fail, so a
    refusal that names the pixel count proves the pixels were never decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_message(url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A folder the server may read images from (--allow-local-files), beside a file it must not."""
    root = tmp_path_factory.mktemp("serve_files")
    (root / "shared").mkdir()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(root / "shared" / "green.png")
    Image.new("RGB", (40, 40), (200, 10, 30)).save(root / "secret.png")
    (root / "shared" / "link.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def server(tiny_checkpoint_files, shared):
    args = parse_args(["--model", str(tiny_checkpoint_files[0]), "--port", "0", "--api-key", KEY,
                       "--max-request-mb", "1", "--max-image-pixels", "1000000", "--max-tokens", str(MAX_NEW),
                       "--temperature", "0", "--batch-wait-ms", "20", "--allow-local-files", str(shared / "shared")])
    service = Service(config_from_args(args))
    service.attach(InferenceEngine.from_checkpoint(tiny_checkpoint_files[0]))
    background = BackgroundServer(service, listen("127.0.0.1", 0))
    yield background
    background.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def image_urls(tiny_checkpoint_files):
    return [data_url(img) for img in tiny_checkpoint_files[1]]


def engine_answer(server, messages: list[dict], images: list, **options) -> tuple[str, ReplyOptions]:
    """What the server's engine answers alone (call only while no request is in flight)."""
    reply = ReplyOptions(max_new_tokens=options.pop("max_tokens", MAX_NEW), stop=options.pop("stop", ()))
    text = server.service.engine.generate([Request(messages, images)], temperature=0.0, options=[reply])[0]
    return text, reply


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of a request sent without the openai client."""
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    connection.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data else None


def assert_serving(server):
    assert raw(server, "GET", "/health")[0] == 200


def test_models_and_health(server, client, model, tiny_checkpoint_files):
    card = client.models.list().data[0]
    assert card.id == tiny_checkpoint_files[0].name == model and card.owned_by == "mm_moslora"
    info = card.mm_moslora
    assert (info["adapter"], info["lora_r"], info["conv_mode"], info["context_length"]) == ("moslora", 8, "vicuna_v1",
                                                                                           1024)
    status, health = raw(server, "GET", "/health", headers={"Authorization": ""})  # no key needed
    assert status == 200 and health["status"] == "ok" and health["batching"]["max_batch_size"] == 32


def test_answer_equals_the_engine(server, client, model, image_urls, tiny_checkpoint_files):
    response = client.chat.completions.create(model=model, messages=[image_message(image_urls[0], "What is it?")])
    expected, reply = engine_answer(server, [{"role": "user", "content": "<image>\nWhat is it?"}],
                                    [tiny_checkpoint_files[1][0]])
    choice = response.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant" and expected
    assert choice.finish_reason == reply.finish_reason
    prompt = server.service.engine.prompt_ids([{"role": "user", "content": "<image>\nWhat is it?"}], 1)
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == reply.n_tokens
    assert response.model == model and response.id.startswith("chatcmpl-")


def test_streaming_pieces_make_the_answer(client, model, image_urls):
    messages = [image_message(image_urls[1], "Describe the colours.")]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) >= 2
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices


def test_multi_turn_with_an_image(server, client, model, image_urls, tiny_checkpoint_files):
    first = client.chat.completions.create(model=model, messages=[image_message(image_urls[2], "What is it?")])
    messages = [{"role": "system", "content": "Answer briefly."}, image_message(image_urls[2], "What is it?"),
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}]
    second = client.chat.completions.create(model=model, messages=messages)
    expected, _ = engine_answer(server, [{"role": "system", "content": "Answer briefly."},
                                         {"role": "user", "content": "<image>\nWhat is it?"},
                                         {"role": "assistant", "content": first.choices[0].message.content},
                                         {"role": "user", "content": "And its colour?"}],
                                [tiny_checkpoint_files[1][2]])
    assert second.choices[0].message.content == expected


def test_stop_and_max_tokens(server, client, model, image_urls):
    messages = [image_message(image_urls[0], "Count the objects.")]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=12).choices[0].message.content
    stop = full[4:7]
    cut = client.chat.completions.create(model=model, messages=messages, max_tokens=12, stop=[stop, "zzz"])
    assert cut.choices[0].message.content == full.split(stop, 1)[0].strip() and cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_local_files_stay_in_their_folder(client, model, shared):
    answer = client.chat.completions.create(model=model, messages=[image_message("green.png", "Colour?")])
    assert answer.choices[0].message.content
    assert client.chat.completions.create(model=model, messages=[image_message(
        (shared / "shared" / "green.png").as_uri(), "Colour?")]).choices[0].message.content == \
        answer.choices[0].message.content
    for path, reason in [("../secret.png", "outside the folder"), (str(shared / "secret.png"), "outside the folder"),
                         ("link.png", "outside the folder"), ("missing.png", "no such image file"),
                         ("https://example.com/cat.png", "http\\(s\\) image URLs are refused"),
                         ("ftp://example.com/cat.png", "unsupported image URL scheme")]:
        with pytest.raises(openai.BadRequestError, match=reason):
            client.chat.completions.create(model=model, messages=[image_message(path, "Colour?")])


def test_concurrent_clients_are_batched(server, client, model, image_urls, tiny_checkpoint_files):
    """12 clients at once, half of them streaming: every one gets the answer it would get alone, and the
    scheduler answered them in batches of more than one."""
    questions = ["What is it?", "Is there a square?", "Describe the colours.", "What shape do you see?"]
    jobs = [(image_urls[i % 4], questions[i % 4], i % 2 == 0) for i in range(12)]
    expected = {(i % 4): engine_answer(server, [{"role": "user", "content": "<image>\n" + questions[i % 4]}],
                                       [tiny_checkpoint_files[1][i % 4]])[0] for i in range(4)}
    before = raw(server, "GET", "/health")[1]["batching"]
    start = threading.Barrier(len(jobs))

    def ask(job):
        url, question, stream = job
        start.wait()
        response = client.chat.completions.create(model=model, messages=[image_message(url, question)], stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in response if c.choices)
        return response.choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [expected[i % 4] for i in range(len(jobs))]
    after = raw(server, "GET", "/health")[1]["batching"]
    assert after["requests"] - before["requests"] == len(jobs)
    new_batches = {size: n - before["batch_sizes"].get(str(size), 0) for size, n in after["batch_sizes"].items()}
    assert max(int(size) for size, n in new_batches.items() if n > 0) > 1


def test_client_disconnecting_mid_stream(server, client, model, image_urls):
    """The client reads two events and hangs up: the engine ends that row (counted as cancelled) long before its
    budget, and the server goes on answering."""
    before = raw(server, "GET", "/health")[1]["batching"]["cancelled"]
    body = json.dumps({"model": model, "messages": [image_message(image_urls[0], "Tell me a long story.")],
                       "max_tokens": 900, "stream": True}).encode()
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    connection.request("POST", "/v1/chat/completions", body=body,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    assert response.readline().startswith(b"data: ")
    connection.sock.close()
    connection.close()
    deadline = time.monotonic() + 30
    while raw(server, "GET", "/health")[1]["batching"]["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raw(server, "GET", "/health")[1]["batching"]["cancelled"] == before + 1
    assert client.chat.completions.create(model=model, messages=[image_message(image_urls[0], "Hi?")]).choices


def test_bad_requests_get_their_own_errors(server, client, model, image_urls):
    def refused(error, match: str, **fields):
        request = {"model": model, "messages": [image_message(image_urls[0], "What is it?")], **fields}
        with pytest.raises(error, match=match) as info:
            client.chat.completions.create(**request)
        assert info.value.body["message"] and "type" in info.value.body  # OpenAI's error object
        assert_serving(server)
        return info.value

    assert refused(openai.NotFoundError, "'gpt-4o' does not exist", model="gpt-4o").code == "model_not_found"
    garbage = "data:image/png;base64," + base64.b64encode(b"not a picture at all").decode()
    refused(openai.BadRequestError, "not an image PIL can read", messages=[image_message(garbage, "What?")])
    text_url = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    refused(openai.BadRequestError, "'text/plain', not an image", messages=[image_message(text_url, "What?")])
    refused(openai.BadRequestError, "base64 is invalid", messages=[image_message("data:image/png;base64,@@@", "?")])
    big = data_url(Image.new("RGB", (1100, 1000), (9, 9, 9)))  # 1.1 megapixels, a valid PNG
    assert refused(openai.BadRequestError, r"1100x1000 = 1100000 pixels, more than the limit of 1000000",
                   messages=[image_message(big, "What?")]).code == "image_too_large"
    header_only = "data:image/png;base64," + base64.b64encode(png_header_only(6000, 6000)).decode()
    refused(openai.BadRequestError, "6000x6000 = 36000000 pixels.*it was not decoded",
            messages=[image_message(header_only, "What?")])
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(40000, 40000)).decode()
    refused(openai.BadRequestError, "decompression bomb|not decoded", messages=[image_message(bomb, "What?")])
    long_text = "word " * 1100
    assert refused(openai.BadRequestError, "the prompt has .* tokens .* context holds 1024",
                   messages=[image_message(image_urls[0], long_text)]).code == "context_length_exceeded"
    refused(openai.BadRequestError, "'n'=2 is not supported", n=2)
    refused(openai.BadRequestError, "'seed'=1 is not supported", seed=1)
    refused(openai.BadRequestError, "'temperature' must be in \\[0, 2\\]", temperature=3)
    refused(openai.BadRequestError, "last message must be the user's",
            messages=[image_message(image_urls[0], "Hi"), {"role": "assistant", "content": "Hello"}])
    refused(openai.BadRequestError, "may not contain '<image>'", messages=[{"role": "user", "content": "<image> hi"}])
    refused(openai.BadRequestError, "role 'tool' is not supported",
            messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    refused(openai.BadRequestError, "at most 8", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_urls[0]}}] * 9 + [{"type": "text", "text": "?"}]}])


def test_bad_http_and_keys(server, model, image_urls):
    status, body = raw(server, "POST", "/v1/chat/completions", b'{"model": "x", "messages": [',
                       {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "must be a JSON object" in body["error"]["message"]
    too_big = json.dumps({"model": model, "messages": [image_message(
        data_url(Image.effect_noise((700, 700), 80).convert("RGB")), "?")]}).encode()
    assert len(too_big) > 2**20
    status, body = raw(server, "POST", "/v1/chat/completions", too_big)
    assert status == 413 and "more than the limit of 1048576" in body["error"]["message"]
    assert raw(server, "GET", "/v1/nothing")[0] == 404 and raw(server, "GET", "/v1/chat/completions")[0] == 405
    request = json.dumps({"model": model, "messages": [image_message(image_urls[0], "Hi")]}).encode()
    for path, body in [("/v1/chat/completions", request), ("/v1/models", None)]:
        status, answer = raw(server, "POST" if body else "GET", path, body, {"Authorization": ""})
        assert status == 401 and "missing API key" in answer["error"]["message"]
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.chat.completions.create(model=model, messages=[image_message(image_urls[0], "Hi")])
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.models.list()
    assert_serving(server)


def test_a_server_still_loading_says_so(tiny_checkpoint_files):
    service = Service(config_from_args(parse_args(["--model", str(tiny_checkpoint_files[0]), "--port", "0"])))
    background = BackgroundServer(service, listen("127.0.0.1", 0))
    try:
        status, body = raw(background, "GET", "/health")
        assert status == 503 and body["status"] == "loading"
        status, body = raw(background, "POST", "/v1/chat/completions",
                           json.dumps({"model": service.config.model_name, "messages": [
                               {"role": "user", "content": "hi"}]}).encode())
        assert status == 503 and body["error"]["code"] == "model_loading"
        status, page = background_page(background)
        assert status == 200 and "<title>mm_moslora chat</title>" in page
    finally:
        background.stop()


def background_page(background) -> tuple[int, str]:
    connection = http.client.HTTPConnection(background.url.removeprefix("http://"), timeout=30)
    connection.request("GET", "/")
    response = connection.getresponse()
    return response.status, response.read().decode()


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/ckpt"], "/nonexistent/ckpt: not an mm_moslora checkpoint"),
    (["--allow-local-files", "/nonexistent/dir"], "--allow-local-files /nonexistent/dir: no such folder"),
])
def test_cli_errors_are_one_line(tiny_checkpoint_files, capsys, argv, message):
    if argv[0] != "--model":
        argv = ["--model", str(tiny_checkpoint_files[0]), *argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}" or message in err and len(err.strip().splitlines()) == 1


def test_cli_port_in_use(tiny_checkpoint_files, capsys):
    taken = listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert cli.main(["--model", str(tiny_checkpoint_files[0]), "--port", str(port)]) == 2
        assert f"error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        taken.close()
