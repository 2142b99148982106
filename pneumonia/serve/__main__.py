"""`python -m pneumonia.serve --ckpt FILE [--host 127.0.0.1 --port 8000]`: the web page and
JSON API of one trained model (`pneumonia.serve.app`), until Ctrl-C.

It binds to 127.0.0.1 (this machine only) unless --host says otherwise: the server has no
authentication, so expose it beyond the machine only behind a proxy that adds it.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser

from pneumonia.bounds import PositiveInt
from pneumonia.config import (
    add_device_option,
    add_threshold_option,
    check_device,
    parse_args,
    threshold_override,
    tool_parser,
)
from pneumonia.errors import UserError, exit_on_user_error
from pneumonia.predictor import Predictor
from pneumonia.serve.app import MAX_UPLOAD, create_app


def build_parser() -> ArgumentParser:
    parser = tool_parser("python -m pneumonia.serve", __doc__)
    parser.add_argument("--ckpt", type=str, required=True, help="best.ckpt of a run")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to bind to")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    add_threshold_option(parser)
    parser.add_argument(
        "--max_upload_mb", type=PositiveInt, default=MAX_UPLOAD >> 20, help="upload size limit"
    )
    add_device_option(parser)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(build_parser(), argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} must be between 0 and 65535")
    check_device(args.device)
    threshold = threshold_override(args)
    predictor = Predictor.from_checkpoint(args.ckpt, threshold, args.device)
    app = create_app(predictor, args.max_upload_mb << 20)
    model = predictor.model
    print(
        f"serving {model.name} ({model.image_size} px, checkpoint {model.checkpoint}) on "
        f"http://{args.host}:{args.port}/  (API: /docs; Ctrl-C stops)",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
