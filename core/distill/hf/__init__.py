"""Hugging Face ``transformers`` models as teachers and students (the ``hf`` upload format).

- :mod:`.archive`: recognise an ``hf`` zip (a ``save_pretrained`` folder), refuse what must not
  be opened (pickled weights, custom code) and unzip it safely;
- :mod:`.models`: load the folder (never ``trust_remote_code``), the model as an ``nn.Module``
  over packed token inputs, the teacher, the signature's ``hf`` block;
- :mod:`.text`: ``.jsonl`` text encoded by the teacher's own tokenizer;
- :mod:`.students`: students made from the teacher (fewer layers, narrower), from a config, or
  an uploaded ``hf`` student with the same vocabulary;
- :mod:`.export`: ``student_hf`` (a ``save_pretrained`` zip) and ``student_onnx``.

Inputs travel through the engine as one int64 tensor ``(N, 2, L)``: ``x[:, 0]`` the token ids,
``x[:, 1]`` the attention mask, so that the trainer, the cache and the evaluation index rows of
one tensor as they do for every other model.
"""

HF_FORMAT = "hf"
