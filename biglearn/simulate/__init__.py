"""The paper's Gaussian-mixture simulations (method.md sections 3-4), pure PyTorch.

mixture:   closed-form Gaussian mixtures (densities, linear views, marginals, conditionals).
gmm25:     the 25-GMM reverse-KL experiment, every seed in one batched computation.
landscape: the 2-GMM objective landscapes by Gauss-Hermite quadrature, and descent on them.
figures:   PNG drawings of the results (PIL).
"""
