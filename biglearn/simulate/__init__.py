"""The paper's Gaussian-mixture simulations (paper Sections 3.3 and 4.1; docs/method.md section 6),
pure PyTorch.

mixture:   closed-form Gaussian mixtures (densities, linear views, marginals, conditionals).
gmm25:     the 25-GMM reverse-KL experiment, every seed in one batched computation.
landscape: the 2-GMM objective landscapes by Gauss-Hermite quadrature, and descent on them.
figures:   PNG drawings of the results (PIL).
"""
