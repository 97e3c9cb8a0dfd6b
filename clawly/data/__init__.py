"""The prompts: category-labelled templates expanded into prompt tables, and the tables' files.

`templates` expands `clawly/data/templates.yaml` (with the template-level hold-out), adds user files and
Hugging Face datasets; `prompts` reads and writes `data/prompts/{harmful,harmless}.parquet` (id,
text, category, split, system) and resolves each row's system prompt. Imports only the core modules
(`clawly.settings`, `errors`, `io`, `paths`). Its modules are not imported here, so a stage that
reads prompts depends on `prompts` alone.
"""
