"""DVC stage 'probe-writers': clawly/steps/probe_writers.py."""

from clawly.steps import probe_writers
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("probe-writers", probe_writers.run)
