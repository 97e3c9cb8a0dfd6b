"""DVC stage 'export-lora': see clawly.pipeline.export_lora."""

from clawly.pipeline import export_lora
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("export-lora", export_lora)
