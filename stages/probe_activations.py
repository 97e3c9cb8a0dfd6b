"""DVC stage 'probe-activations': see clawly.pipeline.probe_activations."""

from clawly.pipeline import probe_activations
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("probe-activations", probe_activations)
