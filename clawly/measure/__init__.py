"""Measuring a model: what it is asked (`templating`), its answers scored fast (`decoding`:
shared-prefix cache, early stop, batch compaction; `scoring`: a trial's KL and refusals), what an
answer does with a request (`stance`: the keyword rules and the five labels; `classify`: the
response classifier), KL (`logprobs`) and the slow reference the fast path is tested against
(`reference`).

May import `clawly.model` and the core modules; nothing that changes weights.
"""
