"""flux-qlora: the pieces shared by compute_embeddings.py, train_qlora_flux.py and infer.py."""

import logging

# Imported before diffusers: torchao warns once per optional CUDA kernel library it can't load (any CPU machine,
# other CUDA builds) and torch's pytree about torchao's enums; neither is something a user can act on.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
