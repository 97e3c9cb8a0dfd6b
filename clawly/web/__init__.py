"""The web UI (`clawly-web`, the `web` extra): a Gradio app over the same `Pipeline` as the CLI.

`run` holds the server's one job (gradio-free), `form` maps the settings to form fields
(gradio-free), `app` builds the page, `main` is the command.
"""
