"""GAPM: Generative model without prior distribution matching (Geng et al., AAAI 2021).

The method as plain PyTorch: the networks (`networks`), the latent BatchNorm, the paper's
losses as pure functions (`losses`), the two-stage model (`model.GAPM`) with one step function
per stage (`steps`), and the paper's baselines (`baselines`, one file each). Every method
implements the `method.Method` protocol; `methods.METHODS` names them all and rebuilds a model
from a checkpoint's meta and weights (`model_from_meta`). The conventions everything around a
model shares live here once: image or points and the data <-> model spaces (`spaces`), and
seeded sampling / reconstruction in data space (`sampling`).
This package knows nothing of Accelerate, MLflow, object storage or files.
"""

from gapm.baselines.aae import AAE
from gapm.baselines.age import AGE
from gapm.baselines.alae import ALAE
from gapm.baselines.introvae import IntroVAE
from gapm.baselines.vae import VAE
from gapm.baselines.wae import WAE
from gapm.method import Method, MethodBase, Update, frozen, plain_update
from gapm.methods import METHODS, build_model, method_class, model_from_meta
from gapm.sampling import SAMPLE_BATCH, SampleStream, reconstruct, sample
from gapm.model import GAPM, Autoencoder, GAPMHyperparameters
from gapm.shape import ModelShape
from gapm.spaces import is_image_shape, to_data_space, to_model_space
from gapm.steps import (
           Stage1Hyperparameters,
           Stage2Hyperparameters,
           stage1_step,
           stage2_step,
)

__all__ = ["GAPM", "AAE", "AGE", "ALAE", "Autoencoder", "GAPMHyperparameters", "IntroVAE", "METHODS", "Method",
           "MethodBase", "ModelShape", "SAMPLE_BATCH", "SampleStream", "Stage1Hyperparameters",
           "Stage2Hyperparameters", "Update", "VAE", "WAE", "build_model", "frozen", "is_image_shape",
           "method_class", "model_from_meta", "plain_update", "reconstruct", "sample", "stage1_step",
           "stage2_step", "to_data_space", "to_model_space"]
