"""DVC stage 'export-lora': clawly/steps/export_lora.py."""

from clawly.steps import export_lora
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("export-lora", export_lora.run)
