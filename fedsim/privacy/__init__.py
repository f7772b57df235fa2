"""Privacy mechanisms and accounting for private federated aggregation.

Pure functions, each taking an explicit ``numpy.random.Generator``, one mechanism
per module, after Bhowmick et al. (2018, arXiv 1812.00984) and the papers cited in each:

* :mod:`~fedsim.privacy.flat` and :mod:`~fedsim.privacy.clipping`: a model's named
  arrays as one vector, and its L2 clipping;
* :mod:`~fedsim.privacy.gaussian`: the Gaussian mechanism;
* :mod:`~fedsim.privacy.privunit` and :mod:`~fedsim.privacy.scalar_dp`: the local
  randomizers of Bhowmick et al. (2018) for a direction and a magnitude, which
  :mod:`~fedsim.privacy.separated` composes into one local privatizer;
* :mod:`~fedsim.privacy.central` and :mod:`~fedsim.privacy.adaptive_clipping`:
  DP-FedAvg's noisy average and clip-norm update (Poisson cohorts are drawn by
  ``fedsim.strategies.sampling.poisson_cohort``);
* :mod:`~fedsim.privacy.accounting`: epsilon of the Poisson-subsampled Gaussian
  over rounds, and noise calibration (imports Opacus, so it is not imported here);
* :mod:`~fedsim.privacy.secagg`: secure aggregation's field quantization, masks and
  cryptography (the protocol is ``fedsim.strategies.SecureAggregation``).
"""
