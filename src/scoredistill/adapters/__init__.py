"""Adapters for diffusers models: teachers from pipeline folders, students and critics (full copies
or peft LoRA), VAE latents and export back to diffusers. See docs/diffusers.md.

Modules (diffusers/transformers/peft are imported lazily, inside functions):

* :mod:`.diffusers_teacher` -- ``teacher.kind: diffusers``: process/prediction from the scheduler,
  cached prompt embeddings, canonical CFG, FLUX guidance embedding.
* :mod:`.student` -- ``DiffusersGenerator`` (1..K-step student, backward simulation) and critics.
* :mod:`.lora` -- LoRA attach/toggle, the LoRA critic sharing the teacher's weights, merging.
* :mod:`.export` -- ``scoredistill export`` (pipeline folder or LoRA weights, verified by reloading).
* :mod:`.latents` -- VAE encode/decode of real data.
* :mod:`.tiny` -- tiny random pipelines of every supported architecture (tests, benchmarks).
"""

from scoredistill.adapters import student as _student  # noqa: E402,F401  (registers DiffusersGenerator folders)
