"""mm_moslora.chat: an interactive session in a real pseudo-terminal, one-shot use, and bad input."""
from __future__ import annotations

import json
import sys

import pexpect
import pytest

from mm_moslora import chat
from mm_moslora.data.images import load_image
from mm_moslora.infer import InferenceEngine
from tests.helpers import REPO_ROOT, make_images, make_tiny_checkpoint, single_thread, subprocess_env

MAX_NEW = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return make_tiny_checkpoint(root / "ckpt"), make_images(root / "images", 2)


@pytest.fixture(scope="module")
def expected(files):
    """What the engine answers, asked directly: the chat must show exactly this."""
    with single_thread():
        engine = InferenceEngine.from_checkpoint(files[0])
        image0, image1 = (load_image(p) for p in files[1])
        first = [{"role": "user", "content": "<image>\nWhat is this?"}]
        a1 = engine.generate([(first, [image0])], max_new_tokens=MAX_NEW)[0]
        second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And the colours?"}]
        a2 = engine.generate([(second, [image0])], max_new_tokens=MAX_NEW)[0]
        a3 = engine.generate([(first, [image1])], max_new_tokens=MAX_NEW)[0]
    return a1, a2, a3


def spawn(files, *extra: str, max_new: int = MAX_NEW) -> pexpect.spawn:
    args = ["-m", "mm_moslora.chat", "--model", str(files[0]), "--image", str(files[1][0]), "--max-new-tokens",
            str(max_new), "--temperature", "0", "--device", "cpu", *extra]
    return pexpect.spawn(sys.executable, args, cwd=str(REPO_ROOT), env=subprocess_env(), encoding="utf-8",
                         timeout=90, dimensions=(40, 400))


@pytest.fixture(scope="module")
def sessions(files):
    """Both terminal sessions start at once: their start-up (imports, model load) overlaps."""
    children = {"short": spawn(files), "long": spawn(files, max_new=2000)}
    yield children
    for child in children.values():
        child.close(force=True)


def ask(child: pexpect.spawn, text: str) -> str:
    child.sendline(text)
    child.expect_exact("ASSISTANT: ")
    child.expect_exact("USER: ")
    return child.before.strip()


def test_interactive_session(sessions, files, expected, tmp_path):
    a1, a2, a3 = expected
    child = sessions["short"]
    child.expect_exact("Type /help for commands.")
    child.expect_exact("USER: ")
    assert ask(child, "What is this?") == a1
    assert ask(child, "And the colours?") == a2  # the history is part of the prompt
    saved = tmp_path / "conversation.json"
    child.sendline(f"/save {saved}")
    child.expect_exact("saved 4 messages")
    child.sendline("/image /no/such/image.png")
    child.expect_exact("error: /no/such/image.png: no such file")
    child.sendline(f"/image {files[1][0].parent}")
    child.expect_exact("is a directory, not an image")
    child.sendline("")
    child.expect_exact("error: empty prompt")
    child.sendline(f"/image {files[1][1]}")
    child.expect_exact("(new conversation)")
    assert ask(child, "What is this?") == a3
    child.sendline("/reset")
    child.expect_exact("new conversation")
    assert ask(child, "What is this?") == a3  # nothing of the old conversation is left
    child.sendline("/help")
    child.expect_exact("/save FILE")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    conversation = json.loads(saved.read_text())
    assert conversation["image"] == str(files[1][0]) and conversation["conv_mode"] == "vicuna_v1"
    assert conversation["messages"] == [
        {"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": a1},
        {"role": "user", "content": "And the colours?"}, {"role": "assistant", "content": a2}]


def test_ctrl_c_stops_the_reply_and_ctrl_d_exits(sessions):
    child = sessions["long"]  # up to 2000 new tokens: the random model does not stop by itself, Ctrl-C does
    child.expect_exact("USER: ")
    child.sendline("Tell me everything.")
    child.expect_exact("ASSISTANT: ")
    child.expect(r"\S")  # the reply has started streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("USER: ")
    child.sendline("/save /dev/null")
    child.expect_exact("saved 2 messages")  # the partial reply stays in the history
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    with single_thread():
        code = chat.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_one_shot_prompt_and_json(files, expected, capsys):
    common = ["--model", str(files[0]), "--image", str(files[1][0]), "--max-new-tokens", str(MAX_NEW),
              "--temperature", "0", "--device", "cpu", "--prompt", "What is this?"]
    code, out, _ = run_main(capsys, *common)
    assert code == 0 and out == expected[0] + "\n"
    code, out, _ = run_main(capsys, *common, "--json")
    assert code == 0
    assert json.loads(out) == {"prompt": "What is this?", "answer": expected[0], "image": str(files[1][0])}


@pytest.mark.parametrize("args, message", [
    (["--image", "/no/such.png"], "error: /no/such.png: no such file"),
    (["--image", "https://example.com/cat.png"], "remote images are only fetched with --allow-url"),
    (["--load-4bit"], "error: --load-4bit needs a CUDA GPU"),
    (["--load-8bit"], "error: --load-8bit needs a CUDA GPU"),
    (["--prompt", "  "], "error: --prompt is empty"),
])
def test_bad_input_is_one_line_error(files, capsys, args, message):
    code, out, err = run_main(capsys, "--model", str(files[0]), "--device", "cpu", "--prompt", "hi", *args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_prompt_longer_than_context_keeps_the_chat(files):
    with single_thread():
        args = chat.parse_args(["--model", str(files[0]), "--max-new-tokens", "2", "--temperature", "0"])
        session = chat.Chat(InferenceEngine.from_checkpoint(files[0]), args)
        session.set_image(str(files[1][0]))
        first = session.ask("Hello")
        with pytest.raises(chat.ChatError, match="more than the model's context of 1024: /reset"):
            session.ask("word " * 1100)
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        assert session.ask("Hello again") and session.messages[1]["content"] == first
