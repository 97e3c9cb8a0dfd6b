"""DVC stage 'probe-activations': clawly/steps/probe_activations.py."""

from clawly.steps import probe_activations
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("probe-activations", probe_activations.run)
