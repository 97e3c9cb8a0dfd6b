"""Saving results: a trial's change as it is saved (adapter factors, merged model deltas), the
PEFT adapter, the merged model, the model card and the reproduction record (`export`), and the
upload to the Hugging Face Hub (`hub`).

May import `clawly.ablate`, `clawly.measure`, `clawly.model`, `clawly.data` and the core modules.
"""
