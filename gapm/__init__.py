"""GAPM: Generative model without prior distribution matching (Geng et al., AAAI 2021).

The method as plain PyTorch: networks, the latent BatchNorm, the losses (pure functions
with the paper's equation numbers), the two-stage model and one step function per stage;
and the paper's baselines (`gapm.baselines`, their losses in `gapm.baseline_losses`).
This package knows nothing of Accelerate, MLflow, object storage or files.
"""

from gapm.model import GAPM, Autoencoder, ModelShape
from gapm.steps import Stage1Hyperparameters, Stage2Hyperparameters, stage1_step, stage2_step
from gapm.baselines import AAE, AGE, ALAE, METHODS, VAE, WAE, IntroVAE, build_model

__all__ = ["GAPM", "Autoencoder", "ModelShape", "Stage1Hyperparameters",
           "Stage2Hyperparameters", "stage1_step", "stage2_step",
           "AAE", "AGE", "ALAE", "IntroVAE", "METHODS", "VAE", "WAE", "build_model"]
