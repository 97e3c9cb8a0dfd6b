"""DVC stage 'distill': clawly/steps/distill.py."""

from clawly.steps import distill
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("distill", distill.run)
