"""Every file passed between stages, with its typed reader and writer: one module per directory.

- `prompts`: `data/prompts/{harmful,harmless}.parquet` (id, text, category, split).
  generate-datasets -> probe-activations, optimize, export-lora, evaluate.
- `activations`: `activations/{harmful,harmless}.parquet` (one row per prompt and probe point) and
  `activations/means.safetensors`. probe-activations -> compute-directions.
- `directions`: `directions/directions.safetensors` (`RefusalDirections`) and
  `directions/orthogonalized.safetensors` (`AblationDirections`). compute-directions ->
  orthogonalize-categories -> optimize, export-lora (and beside every saved adapter or model).
- `optimize`: `optimize/chosen_trial.json` (`ChosenTrial`) and `optimize/prompts.parquet` (the
  prompts the optimizer saw). optimize -> export-lora, evaluate.

The adapter and the merged model are ecosystem formats (peft, transformers) with clawly's
reproduction record beside them: `clawly.export` reads and writes those. This package imports
none of its modules, so a stage that reads prompts depends on `prompts` alone.
"""
