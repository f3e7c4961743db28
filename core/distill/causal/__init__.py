"""Causal language models (``hf`` teachers with ``task: causal_lm``): a smaller GPT from a GPT.

- :mod:`.data`: ``{"text"}`` lines packed into ``max_length`` windows, ``{"prompt",
  "completion"}`` lines with the loss on the completion's tokens;
- :mod:`.cache`: the teacher's top-k logits per token, memory-mapped and shared by the jobs on
  the same (teacher, dataset, max_length, k);
- :mod:`.train`: the per-token losses of ``core.distill.methods`` (``kd``, ``reverse_kl``,
  ``jsd``) and the next-token baseline, a checkpoint after every epoch;
- :mod:`.evaluate`: perplexity, token agreement, KL to the teacher, decoding speed, samples;
- :mod:`.export`: ``student_hf`` and ``student_onnx`` (logits), checked by reloading;
- :mod:`.pipeline`: the job, from the loaded teacher to the result and artifacts.
"""
