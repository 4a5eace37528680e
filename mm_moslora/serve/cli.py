"""`mm-moslora-serve`: the command line, loading the model behind a listening server, and a server in a thread.

    mm-moslora-serve --model OUT                       # http://127.0.0.1:8000: chat page at /, OpenAI API at /v1
    python -m mm_moslora.serve --model OUT --host 0.0.0.0 --port 8080 --api-key "$KEY"
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from ..adapters.io import read_adapter_config
from ..infer import DECODE_MODES, InferenceEngine, QuantizationUnavailable, check_quantization
from ..checkpoint import CheckpointConfig

try:  # the `serve` extra
    import uvicorn

    from .app import ServeConfig, Service, create_app
    from .images import ImagePolicy
    from .protocol import Defaults
    MISSING = None
except ImportError as err:
    MISSING = err

API_KEY_ENV = "MM_MOSLORA_API_KEY"
log = logging.getLogger("mm_moslora.serve")


def describe_checkpoint(path: Path) -> dict:
    """What /v1/models and the page show about a checkpoint: adapter kind and rank, base models, template."""
    config = CheckpointConfig.read(path)
    info = {"checkpoint": str(path), "base_model": config.model_name_or_path, "vision_tower": config.vision_tower,
            "conv_mode": config.conv_mode}
    try:
        adapter = read_adapter_config(str(path))
        info.update(adapter=adapter.adapter, lora_r=adapter.r, lora_alpha=adapter.alpha)
    except FileNotFoundError:  # a stage-1 output, or a merged export (which records what it folded in)
        merged = config.merged_adapter or {}
        info.update(adapter=merged.get("adapter", "none"), merged=config.merged,
                    **({"lora_r": merged["r"]} if "r" in merged else {}))
    if config.vision_adapter:
        info["vision_adapter"] = config.vision_adapter.get("adapter")
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (mm_config.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--served-model-name", help="the model's name in the API (default: the folder's name)")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on a GPU, else fp32")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="NF4 weights through bitsandbytes (GPU only)")
    quant.add_argument("--load-8bit", action="store_true", help="int8 weights through bitsandbytes (GPU only)")
    parser.add_argument("--conv-mode", help="conversation template (default: the checkpoint's)")
    parser.add_argument("--decode", choices=DECODE_MODES, default="auto", help="decoder (see InferenceEngine)")
    sampling = parser.add_argument_group("defaults for requests that leave these out")
    sampling.add_argument("--temperature", type=float, default=0.2)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--max-tokens", type=int, default=512)
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch-size", type=int, default=32, help="requests answered together at most")
    batching.add_argument("--batch-wait-ms", type=float, default=5.0,
                          help="after a request arrives at an idle server, gather others until none came for this "
                               "long (at most 8x)")
    limits = parser.add_argument_group("limits and image sources")
    limits.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body")
    limits.add_argument("--max-image-pixels", type=int, default=25_000_000,
                        help="larger images are refused before they are decoded")
    limits.add_argument("--max-images", type=int, default=8, help="images per request")
    limits.add_argument("--allow-local-files", metavar="DIR",
                        help="let image_url name files in DIR (paths or file:// URLs; nothing outside DIR)")
    limits.add_argument("--allow-remote-images", action="store_true", help="let image_url fetch http(s) URLs")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    for name in ("max_tokens", "max_batch_size", "max_images", "max_image_pixels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.temperature <= 2 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be in [0, 2] and --top-p in (0, 1]")
    if args.max_request_mb <= 0 or args.batch_wait_ms < 0:
        parser.error("--max-request-mb must be positive and --batch-wait-ms at least 0")
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key is empty")
    return args


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Check what can be checked before loading (raises ValueError/FileNotFoundError with a one-line message)."""
    model = Path(args.model)
    info = describe_checkpoint(model)
    local_root = None
    if args.allow_local_files:
        local_root = Path(args.allow_local_files).expanduser()
        if not local_root.is_dir():
            raise FileNotFoundError(f"--allow-local-files {args.allow_local_files}: no such folder")
    max_bytes = int(args.max_request_mb * 2**20)
    return ServeConfig(
        model_name=args.served_model_name or model.resolve().name, api_key=args.api_key,
        max_request_bytes=max_bytes, max_images=args.max_images,
        images=ImagePolicy(args.max_image_pixels, max_bytes, local_root, args.allow_remote_images),
        defaults=Defaults(args.temperature, args.top_p, args.max_tokens), max_batch_size=args.max_batch_size,
        gather_s=args.batch_wait_ms / 1000, model_info=info)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (bind errors become one-line errors before anything is loaded)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


class BackgroundServer:
    """uvicorn serving `service` on `sock` in a thread (tests, benchmarks); `stop()` shuts it down."""

    def __init__(self, service: Service, sock: socket.socket, log_level: str = "warning"):
        self.service, self.sock, self.url = service, sock, url_of(sock)
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level=log_level, lifespan="off",
                                                    access_log=False, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if MISSING is not None:
        print(f"error: mm-moslora-serve needs the serve extra: pip install 'mm_moslora[serve]' ({MISSING})",
              file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantize = "4bit" if args.load_4bit else "8bit" if args.load_8bit else None
    dtype = args.dtype or ("fp32" if not device.startswith("cuda") else "fp16" if args.load_8bit else "bf16")
    try:
        if quantize:
            check_quantization(quantize, device)
        config = config_from_args(args)
        sock = listen(args.host, args.port)
    except (QuantizationUnavailable, FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    service = Service(config)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level=args.log_level, lifespan="off",
                                           timeout_graceful_shutdown=5))
    failed: list[str] = []

    def load() -> None:
        started = time.perf_counter()
        try:
            engine = InferenceEngine.from_checkpoint(args.model, device=device, dtype=dtype, conv_mode=args.conv_mode,
                                                     quantize=quantize, decode=args.decode)
        except Exception as err:  # the one-line reason, then the server stops
            failed.append(f"cannot load {args.model}: {type(err).__name__}: {err}")
            print(f"error: {failed[-1]}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        service.attach(engine)
        print(f"[mm_moslora] model loaded in {time.perf_counter() - started:.1f} s on {device} ({dtype}): ready",
              flush=True)

    info = config.model_info
    print(f"[mm_moslora] serving {config.model_name} ({info['adapter']} adapter) at {url_of(sock)}: chat page at /, "
          f"OpenAI API at /v1, health at /health{'; API key required' if config.api_key else ''}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"[mm_moslora] warning: listening on {args.host} without --api-key: anyone who can reach this port "
              f"can use the model", file=sys.stderr, flush=True)
    threading.Thread(target=load, name="mm_moslora-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
    return 1 if failed else 0
