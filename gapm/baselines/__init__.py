"""The paper's baselines — VAE, AAE, WAE-MMD, IntroVAE, AGE (Table 1) and ALAE (Fig. 4–5) — one
file each, built from GAPM's own networks (`gapm.networks`; "we apply the same architectures",
paper Sec. Experiments), so every method runs on 2-D points and on 28×28, 32×32 and 64×64 images.
Each implements the `gapm.method.Method` protocol through `MethodBase`, as GAPM does; their
losses are pure functions in `gapm.baselines.losses`.

The prior is N(0, I) in the latent space itself (latent_dim) for VAE, AAE, WAE and IntroVAE —
they match the prior there directly, which is the paper's point — and for AGE normalised onto
the unit sphere as in its reference. ALAE maps N(0, I) of prior_dim through its mapping network F.
"""
