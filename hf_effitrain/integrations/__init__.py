"""Glue between the package's ops and transformers models: finding a model's LM head and logit transform so that a
fused loss can replace it (`lm_head`), and the `kernels` layer mapping of the package's hub layers
(`kernel_mapping`)."""
