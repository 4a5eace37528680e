"""Chat with a checkpoint about an image in the terminal (streamed replies, multi-turn history).

    python -m mm_moslora.chat --model CKPT --image photo.jpg
    python -m mm_moslora.chat --model CKPT --image photo.jpg --prompt "What is this?" [--json]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import urllib.request
from pathlib import Path

import torch
from PIL import Image

from .data.conversation import IMAGE_PLACEHOLDER
from .data.images import ImageError, load_image
from .errors import InputError
from .infer import InferenceEngine, PromptTooLongError, QuantizationUnavailable, check_quantization

HELP = """commands:
  /image PATH   talk about another image (starts a new conversation)
  /reset        start a new conversation about the same image
  /save FILE    write the conversation to FILE as JSON
  /help         show this text
  /exit         quit (Ctrl-D too); Ctrl-C stops a reply"""


class ChatError(InputError):
    """Bad user input: reported on one line, and the chat goes on."""


MAX_DOWNLOAD_BYTES = 64 << 20  # an image URL that sends more is refused (the pixel limit is load_image's)


def open_image(spec: str, allow_url: bool) -> Image.Image:
    """A local path, or an http(s) URL when allowed -> decoded RGB image."""
    if spec.startswith(("http://", "https://")):
        if not allow_url:
            raise ChatError(f"{spec}: remote images are only fetched with --allow-url")
        try:
            with urllib.request.urlopen(spec, timeout=30) as response:
                data = response.read(MAX_DOWNLOAD_BYTES + 1)
            if len(data) > MAX_DOWNLOAD_BYTES:
                raise ChatError(f"{spec}: more than {MAX_DOWNLOAD_BYTES >> 20} MiB, not fetched")
            return load_image(io.BytesIO(data))
        except InputError as err:
            raise ChatError(str(err).replace("image:", f"{spec}:", 1)) from None
        except (OSError, ValueError) as err:
            raise ChatError(f"{spec}: cannot fetch or decode the image ({err})") from None
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ChatError(f"{spec}: is a directory, not an image")
    if not path.is_file():
        raise ChatError(f"{spec}: no such file")
    try:
        return load_image(path)
    except ImageError as err:  # refused before decoding (too many pixels, not a regular file): says why
        raise ChatError(str(err)) from None
    except (OSError, ValueError) as err:
        raise ChatError(f"{spec}: cannot decode the image ({type(err).__name__})") from None


class Chat:
    """A conversation about one image (or none), answered by the engine."""

    def __init__(self, engine: InferenceEngine, args: argparse.Namespace):
        self.engine, self.args = engine, args
        self.image_spec, self.image, self.messages = None, None, []

    def set_image(self, spec: str | None, image: Image.Image | None = None) -> None:
        self.image = image or (open_image(spec, self.args.allow_url) if spec else None)
        self.image_spec, self.messages = spec, []

    def ask(self, text: str, stream=None) -> str:
        """Add the user's turn, generate the reply into the history; on Ctrl-C keep what was said so far."""
        if self.image is not None and not self.messages:
            text = f"{IMAGE_PLACEHOLDER}\n{text}"  # LLaVA puts the image before the first question
        self.messages.append({"role": "user", "content": text})
        pieces = []
        try:
            reply = self.engine.generate([(self.messages, [self.image] if self.image else [])],
                                         max_new_tokens=self.args.max_new_tokens, temperature=self.args.temperature,
                                         top_p=self.args.top_p, stream=lambda piece: [pieces.append(piece),
                                                                                       stream and stream(piece)])[0]
        except PromptTooLongError as err:
            self.messages.pop()
            raise ChatError(f"the conversation is {err.n_tokens} tokens long, more than the model's context of "
                            f"{err.context_length}: /reset to start again, or ask something shorter") from None
        except KeyboardInterrupt:  # keep what the user saw, so the history stays user/assistant pairs
            if "".join(pieces).strip():
                self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})
            else:
                self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def save(self, file: str) -> None:
        data = {"model": self.args.model, "image": self.image_spec, "conv_mode": self.engine.conv_mode,
                "messages": self.messages}
        try:
            Path(file).expanduser().write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as err:
            raise ChatError(f"cannot write {file}: {err.strerror or err}") from None
        print(f"saved {len(self.messages)} messages to {file}")

    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip().strip("'\"")
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            print(HELP)
        elif name == "/reset":
            self.messages = []
            print("new conversation")
        elif name in ("/image", "/save") and not arg:
            raise ChatError(f"usage: {name} {'PATH' if name == '/image' else 'FILE'}")
        elif name == "/image":
            self.set_image(arg)
            print(f"image: {arg} (new conversation)")
        elif name == "/save":
            self.save(arg)
        else:
            raise ChatError(f"unknown command {name} (type /help)")
        return True

    def loop(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"image: {self.image_spec or 'none'}. Type /help for commands.")
        while True:
            try:
                line = input("USER: ").strip()
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print()
                continue
            replying = False
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                    continue
                if not line:
                    raise ChatError("empty prompt (type /help for the commands)")
                print("ASSISTANT: ", end="", flush=True)
                replying = True
                self.ask(line, stream=lambda piece: print(piece, end="", flush=True))
                print()
            except ChatError as err:
                print("\n" * replying, end="", flush=True)  # end the "ASSISTANT: " line first
                print(f"error: {err}", file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                print(" [stopped]", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (mm_config.json)")
    parser.add_argument("--image", help="image path (or URL with --allow-url)")
    parser.add_argument("--prompt", help="ask once, print the answer and exit")
    parser.add_argument("--json", action="store_true", help="with --prompt: print {prompt, answer, image} as JSON")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default: bf16 on a GPU (fp16 with --load-8bit), else fp32")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="NF4 weights through bitsandbytes (GPU only)")
    quant.add_argument("--load-8bit", action="store_true", help="int8 weights through bitsandbytes (GPU only)")
    parser.add_argument("--allow-url", action="store_true", help="let --image and /image fetch http(s) URLs")
    args = parser.parse_args(argv)
    if args.json and args.prompt is None:
        parser.error("--json needs --prompt")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantize = "4bit" if args.load_4bit else "8bit" if args.load_8bit else None
    # bitsandbytes' int8 matmul computes in fp16: bf16 inputs would be cast at every layer.
    dtype = args.dtype or ("fp32" if not args.device.startswith("cuda") else "fp16" if args.load_8bit else "bf16")
    try:
        if quantize:
            check_quantization(quantize, args.device)
        if args.prompt is not None and not args.prompt.strip():
            raise ChatError("--prompt is empty")
        image = open_image(args.image, args.allow_url) if args.image else None  # before the slow model load
        engine = InferenceEngine.from_checkpoint(args.model, device=args.device, dtype=dtype,
                                                 conv_mode=args.conv_mode, quantize=quantize)
        chat = Chat(engine, args)
        chat.set_image(args.image, image)
        if args.prompt is None:
            chat.loop()
            return 0
        answer = chat.ask(args.prompt)
    except (ChatError, QuantizationUnavailable, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"prompt": args.prompt, "answer": answer, "image": args.image}, ensure_ascii=False)
          if args.json else answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
