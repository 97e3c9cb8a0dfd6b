"""`clawly-web`: the Gradio web UI on 127.0.0.1:7860 (the `web` extra).

The configuration starts from the same layers as `clawly`: defaults < `--config FILE` <
`--category-preset NAME` < MODEL; everything after that is set in the page, within what the
operator allows (`clawly.web.guard`): paths inside the output directory (and `--allow-path`), no
model repository code unless `--allow-remote-code`.

Reachable from other machines (`--host` other than loopback, or `--share`) it requires a login: the
password comes from the CLAWLY_WEB_PASSWORD environment variable or `--password-file FILE`, never
from the command line (which other users of the machine can read); with a password it is required
on loopback too.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import os
import sys
from pathlib import Path

from clawly.cli import file_values, output_settings
from clawly.errors import ClawlyError

WEB_EXTRA = "pip install 'clawly[web]'"
PASSWORD_ENV = "CLAWLY_WEB_PASSWORD"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clawly-web",
        description="The clawly web UI: configure, run and watch an abliteration, pick a trial, "
        "export it, chat with it, look at the residual geometry.",
        epilog="examples:\n  clawly-web\n  clawly-web Qwen/Qwen2.5-1.5B-Instruct --category-preset default\n"
        "  clawly-web --config my.yaml --output runs/web --port 8080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )  # `--password SECRET` must not pass as an abbreviation of --password-file
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model the form starts with: 'default' (the packaged Qwen2.5-Coder-0.5B-Instruct), "
        "a Hub id, a model directory or a .gguf file",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or TOML settings the form starts with (the keys of params.yaml)"
    )
    parser.add_argument(
        "--category-preset",
        metavar="NAME",
        help="category preset the form starts with (clawly/conf/preset/NAME.yaml or a YAML file)",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        default="clawly-web-output",
        help="work files (OUTPUT/work) and exports (OUTPUT/exports) [default: clawly-web-output]",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on [default: 127.0.0.1, this machine only]; 0.0.0.0 lets anyone "
        "on the network run models here",
    )
    parser.add_argument("--port", type=int, default=7860, help="port [default: 7860]")
    parser.add_argument(
        "--share",
        action="store_true",
        help="also open a public gradio.live link (off unless asked: it exposes this machine; needs a password)",
    )
    parser.add_argument("--user", default="clawly", help="the login's user name [default: clawly]")
    parser.add_argument(
        "--password-file",
        metavar="FILE",
        help=f"a file whose first line is the login's password (else ${PASSWORD_ENV}); required "
        "with --share or a --host other than loopback",
    )
    parser.add_argument(
        "--allow-path",
        metavar="DIR",
        action="append",
        default=[],
        help="a directory whose files the page may name besides OUTPUT (model directories, prompt files); repeatable",
    )
    parser.add_argument(
        "--allow-remote-code",
        action="store_true",
        help="show model.trust_remote_code and classifier.judge_trust_remote_code in the page: "
        "whoever reaches it can then run a model repository's code on this machine",
    )
    return parser


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_password(args: argparse.Namespace) -> str | None:
    """The login's password: --password-file's first line, else $CLAWLY_WEB_PASSWORD; None if neither."""
    if args.password_file:
        try:
            lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ClawlyError(f"--password-file {args.password_file}: cannot read it ({e})") from e
        if not lines or not lines[0].strip():
            raise ClawlyError(f"--password-file {args.password_file}: the first line is empty; put the password there")
        return lines[0].strip()
    return os.environ.get(PASSWORD_ENV) or None


def login(user: str, password: str):
    """Gradio's auth callable: both compared in constant time."""

    def check(given_user: str, given_password: str) -> bool:
        return hmac.compare_digest(given_user.encode(), user.encode()) & hmac.compare_digest(
            given_password.encode(), password.encode()
        )

    return check


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import gradio  # noqa: F401  (optional: the web extra)
    except ImportError:
        print(f"clawly-web: error: the web UI needs gradio, from the web extra: {WEB_EXTRA}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    exposed = args.share or not loopback(args.host)
    try:
        password = read_password(args)
        if exposed and password is None:
            where = "--share (a public link)" if args.share else f"--host {args.host} (other machines)"
            raise ClawlyError(
                f"{where} needs a login: set the password in the {PASSWORD_ENV} environment variable "
                "or pass --password-file FILE (never on the command line)"
            )
        settings = output_settings(file_values(args.config, args.category_preset), args.model, args.output)
        if not args.allow_remote_code and (
            settings.model.trust_remote_code or settings.classifier.judge_trust_remote_code
        ):
            raise ClawlyError(
                "the start settings allow a model repository's code to run (trust_remote_code): "
                "pass --allow-remote-code to let the web UI do that, or turn it off"
            )
        # deferred with gradio above (optional), and the engine (torch) behind it
        from clawly.web.app import CSS, JS, build_app
        from clawly.web.form import form_keys  # deferred: the engine
        from clawly.web.guard import PagePolicy  # deferred: the engine
        from clawly.web.run import WebRun  # deferred: the engine

        output = Path(args.output).resolve()
        output.mkdir(parents=True, exist_ok=True)
        allowed = tuple(Path(p).resolve() for p in args.allow_path)
        missing = [str(p) for p in allowed if not p.is_dir()]
        if missing:
            raise ClawlyError(f"--allow-path {', '.join(missing)}: not a directory")
        policy = PagePolicy(output, allowed, args.allow_remote_code, form_keys(settings))
        app = build_app(WebRun(output), settings, policy)
    except ClawlyError as e:
        print(f"clawly-web: error: {e}", file=sys.stderr)
        return 2
    if exposed:
        reach = "a public gradio.live link" if args.share else f"{args.host}"
        print(
            f"clawly-web: reachable through {reach}: anyone who has the login ({args.user}) can run models here and "
            f"read {output}",
            file=sys.stderr,
        )
    try:
        app.queue(default_concurrency_limit=4).launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            allowed_paths=[str(output)],
            css=CSS,
            js=JS,
            footer_links=["settings"],
            quiet=False,
            show_error=True,
            auth=login(args.user, password) if password else None,
            auth_message="clawly: log in with the user and password the operator set" if password else None,
        )
    except OSError as e:
        print(
            f"clawly-web: error: cannot listen on {args.host}:{args.port}: {e} (pick another --port)", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
