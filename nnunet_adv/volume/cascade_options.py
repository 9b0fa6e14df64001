"""How an attack's gradient passes a cascade's previous stage (:mod:`nnunet_adv.volume.cascade`); no
torch or nnU-Net import, so that the commands' flags can name the choices before anything loads."""

#: ``softmax``: the previous stage's softmax as a differentiable surrogate of its argmax; ``fixed``: the
#: previous stage held at the clean image's prediction during the attack
GRADIENTS = ("softmax", "fixed")
DEFAULT_GRADIENT = "softmax"
#: one line per choice, for records and reports
GRADIENT_MEANS = {
    "softmax": "exact through the cascade network; through the previous stage's argmax its softmax (surrogate)",
    "fixed": "exact through the cascade network; the previous stage held at its clean prediction (no gradient)",
}
