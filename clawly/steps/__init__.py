"""The pipeline's steps, one module per DVC stage (`stages/<stage>.py` runs `clawly.steps.<stage>.run`).

Each `run(settings, log, ...)` reads its inputs through their packages' file readers
(`clawly.data.prompts`, `clawly.ablate.activations`, `clawly.ablate.directions`,
`clawly.search.chosen`), calls the library and writes its outputs atomically. The `Pipeline` API
and the CLI call the same functions. Nothing here imports the step modules, so a stage depends on
its own step alone.
"""
