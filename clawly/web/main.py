"""`clawly-web`: the Gradio web UI on 127.0.0.1:7860 (the `web` extra).

The configuration starts from the same layers as `clawly`: defaults < `--config FILE` <
`--category-preset NAME` < MODEL; everything after that is set in the page.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from clawly.cli import file_values, output_settings
from clawly.errors import ClawlyError

WEB_EXTRA = "pip install 'clawly[web]'"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clawly-web", description="The clawly web UI: configure, run and watch an abliteration, pick a trial, "
                                       "export it, chat with it, look at the residual geometry.",
        epilog="examples:\n  clawly-web\n  clawly-web Qwen/Qwen2.5-1.5B-Instruct --category-preset default\n"
               "  clawly-web --config my.yaml --output runs/web --port 8080",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="the model the form starts with: 'default' (the packaged Qwen2.5-Coder-0.5B-Instruct), "
                             "a Hub id, a model directory or a .gguf file")
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML settings the form starts with (the keys of "
                                                         "params.yaml)")
    parser.add_argument("--category-preset", metavar="NAME", help="category preset the form starts with "
                                                                  "(conf/preset/NAME.yaml or a YAML file)")
    parser.add_argument("--output", metavar="DIR", default="clawly-web-output",
                        help="work files (OUTPUT/work) and exports (OUTPUT/exports) [default: clawly-web-output]")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on [default: 127.0.0.1, this machine only]; 0.0.0.0 lets anyone "
                             "on the network run models here")
    parser.add_argument("--port", type=int, default=7860, help="port [default: 7860]")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off unless asked: it exposes this machine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401  (optional: the web extra)
    except ImportError:
        print(f"clawly-web: error: the web UI needs gradio, from the web extra: {WEB_EXTRA}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        settings = output_settings(file_values(args.config, args.category_preset), args.model, args.output)
        # deferred with gradio above (optional), and the engine (torch) behind it
        from clawly.web.app import CSS, JS, build_app
        from clawly.web.run import WebRun

        output = Path(args.output).resolve()
        output.mkdir(parents=True, exist_ok=True)
        app = build_app(WebRun(output), settings)
    except ClawlyError as e:
        print(f"clawly-web: error: {e}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"clawly-web: listening on {args.host}: anyone who can reach it can run models and read "
              f"{output}", file=sys.stderr)
    try:
        app.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(output)], css=CSS,
            js=JS, footer_links=["settings"], quiet=False, show_error=True)
    except OSError as e:
        print(f"clawly-web: error: cannot listen on {args.host}:{args.port}: {e} (pick another --port)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
