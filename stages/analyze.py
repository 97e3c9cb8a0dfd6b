"""DVC stage 'analyze': clawly/steps/analyze.py."""

from clawly.steps import analyze
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("analyze", analyze.run)
