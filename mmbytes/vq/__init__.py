"""VQ-tokenized baselines: VQ-VAEs for images and audio, an autoregressive prior over their codes, and the rate and
distortion measures that ``mmbytes compare`` sets beside the byte model.

The plain-torch parts (``quantizer``, ``models``, ``measures``) do not import Lightning; ``lit`` holds the
LightningModules the recipes name (``mmbytes.vq.VQVAEModule``, ``mmbytes.vq.VQPriorModule``).
"""

from mmbytes.vq.lit import VQPriorModule, VQVAEModule, load_prior, load_vq
from mmbytes.vq.models import VQVAE, CodePrior
from mmbytes.vq.quantizer import VectorQuantizer

__all__ = ["VQVAE", "CodePrior", "VQPriorModule", "VQVAEModule", "VectorQuantizer", "load_prior", "load_vq"]
